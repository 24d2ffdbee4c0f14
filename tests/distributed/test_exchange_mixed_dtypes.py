"""Several languages per rank in bf16 with fp32 gradient accumulation, across ranks: each rank's stashed
languages are bf16 parameter pieces, its last language the fp32 bucket, and the sharded exchange
converts the pieces while it fills its all-to-all send buffer. Checked in NumPy on the exact fp32
values: every rank's owned elements get the combination of all four languages, and every rank sees
the four languages' Grams. Also for a one-element bucket, whose second slice is empty."""

from __future__ import annotations

import functools
import os
from datetime import timedelta

import launch
import numpy as np
import pytest
import torch
import torch.distributed as dist

from lightning_moo.buckets import Segment
from lightning_moo.exchange import PieceRows, ShardedExchange
from lightning_moo.layout import LanguageLayout

BUCKETS = {  # elements, parameters, owners
    "uneven partitions": (41, [(0, 6), (6, 29), (29, 41)], (Segment(0, 13, 0), Segment(13, 28, 1))),
    "one element": (1, [(0, 1)], (Segment(0, 1, 0),)),
}
WEIGHTS = np.array([0.1, 0.2, 0.3, 0.4])


def language_rows(n: int) -> tuple[list[torch.Tensor], np.ndarray]:
    """Languages 0 and 2 as bf16 (stashed on ranks 0 and 1), 1 and 3 as fp32 (their buckets); the
    four rows as float64 NumPy (bf16 → fp32 → float64 is exact)."""
    rng = np.random.default_rng(11)
    rows = [torch.tensor(rng.standard_normal(n), dtype=torch.bfloat16 if t % 2 == 0 else torch.float32) for t in range(4)]
    return rows, np.stack([row.double().numpy() for row in rows])


def _rank(bucket: str, rank: int, port: int, out: str) -> None:
    n, pieces, owners = BUCKETS[bucket]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    rows, _ = language_rows(n)
    stashed, tensor = rows[2 * rank], rows[2 * rank + 1].clone()
    others = PieceRows([[(a, stashed[a:b]) for a, b in pieces]])
    grams, _ = ShardedExchange().reduce(tensor, owners, pieces, lambda gram: torch.tensor(WEIGHTS), LanguageLayout.build(4, 2),
                                        others=others)
    dist.barrier()
    dist.destroy_process_group()
    torch.save({"tensor": tensor, "grams": grams}, f"{out}/rank{rank}.pt")


@pytest.mark.timeout(150)
@pytest.mark.parametrize("bucket", list(BUCKETS))
def test_bf16_stashed_pieces_across_two_ranks(tmp_path, bucket):
    launch.spawn_ranks(functools.partial(_rank, bucket), 2, tmp_path, timeout=120)
    n, pieces, owners = BUCKETS[bucket]
    _, rows = language_rows(n)
    combined = WEIGHTS @ rows
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        np.testing.assert_allclose(result["grams"].numpy(), np.stack([rows[:, a:b] @ rows[:, a:b].T for a, b in pieces]), rtol=1e-5)
        for owned in (seg for seg in owners if seg.owner == rank):
            lo, hi = owned.start, owned.start + owned.length
            np.testing.assert_allclose(result["tensor"].numpy()[lo:hi], combined[lo:hi], rtol=1e-5, atol=1e-6)
