"""The DDP hook's gather of the combined slices (``ddp._gather_slices``): every rank ends with every
rank's slice in place, whatever the slices' lengths, empty ones included (3 gloo ranks, CPU)."""

from __future__ import annotations

import os
from datetime import timedelta

import launch
import torch
import torch.distributed as dist

from lightning_moo.buckets import even_segments
from lightning_moo.strategies import ddp

WORLD = 3
SIZES = [2, 3, 7, 1000]  # a bucket of 2 elements leaves rank 2's slice empty


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    group = dist.new_group(backend="gloo")  # the hook gathers on a group of its own
    gathered = []
    for n in SIZES:
        slices = even_segments(n, WORLD)
        tensor = torch.full((n,), float("nan"))
        own = slices[rank]
        tensor[own.start : own.start + own.length] = torch.arange(own.start, own.start + own.length) + 0.5
        ddp._gather_slices(tensor, slices, group)
        gathered.append(tensor)
    dist.barrier()
    dist.destroy_process_group()
    torch.save(gathered, f"{out}/rank{rank}.pt")


def test_every_rank_ends_with_every_slice(tmp_path):
    launch.spawn_ranks(_rank, WORLD, tmp_path, timeout=180)
    for rank in range(WORLD):
        for n, tensor in zip(SIZES, torch.load(tmp_path / f"rank{rank}.pt")):
            assert torch.equal(tensor, torch.arange(n) + 0.5), (rank, n, tensor)
