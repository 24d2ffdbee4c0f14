"""The sharded exchange's sum of the partial Grams over the ranks (``exchange._sum_over_ranks``): on
gloo the partials gathered (an all-gather at 2 ranks, an all-to-all from 3) and summed locally. Every rank must
end with the same bits (each solves on its own) and with the sum of the partials in rank order (gloo, CPU)."""

from __future__ import annotations

import functools
import os
from datetime import timedelta

import launch
import numpy as np
import pytest
import torch
import torch.distributed as dist

from lightning_moo import exchange


def partial(rank: int) -> torch.Tensor:
    """Rank ``rank``'s P×T×T partial Grams: magnitudes over 30 orders, so the order of the sum shows."""
    rng = np.random.default_rng(rank)
    return torch.from_numpy(rng.normal(size=(5, 4, 4)) * 10.0 ** rng.integers(-15, 15, size=(5, 4, 4)))


def _rank(world: int, rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    grams = partial(rank)
    exchange._sum_over_ranks(grams, None)
    dist.barrier()
    dist.destroy_process_group()
    torch.save(grams, f"{out}/rank{rank}.pt")


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_holds_the_same_sum(tmp_path, world):
    launch.spawn_ranks(functools.partial(_rank, world), world, tmp_path, timeout=120)
    sums = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world)]
    assert all(torch.equal(s, sums[0]) for s in sums), "the ranks hold different sums: they would solve differently"
    reference = sum(partial(rank).numpy() for rank in range(world))  # rank order, as every rank sums
    np.testing.assert_array_equal(sums[0].numpy(), reference)
