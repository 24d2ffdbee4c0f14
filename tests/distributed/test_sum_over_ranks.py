"""The sharded exchange's sum of the partial Grams over the ranks (``exchange._sum_over_ranks``): on
gloo an all-to-all of the partials and a local sum. Every rank must end with the same bits (each solves on its own)
and with the sum of the partials (3 gloo ranks, CPU)."""

from __future__ import annotations

import os
from datetime import timedelta

import launch
import numpy as np
import torch
import torch.distributed as dist

from lightning_moo import exchange

WORLD = 3


def partial(rank: int) -> torch.Tensor:
    """Rank ``rank``'s P×T×T partial Grams: magnitudes over 30 orders, so the order of the sum shows."""
    rng = np.random.default_rng(rank)
    return torch.from_numpy(rng.normal(size=(5, 4, 4)) * 10.0 ** rng.integers(-15, 15, size=(5, 4, 4)))


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    grams = partial(rank)
    exchange._sum_over_ranks(grams, None)
    dist.barrier()
    dist.destroy_process_group()
    torch.save(grams, f"{out}/rank{rank}.pt")


def test_every_rank_holds_the_same_sum(tmp_path):
    launch.spawn_ranks(_rank, WORLD, tmp_path, timeout=120)
    sums = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    assert all(torch.equal(s, sums[0]) for s in sums), "the ranks hold different sums: they would solve differently"
    reference = sum(partial(rank).numpy() for rank in range(WORLD))  # rank order, as every rank sums
    np.testing.assert_array_equal(sums[0].numpy(), reference)
