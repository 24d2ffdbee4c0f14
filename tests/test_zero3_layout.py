"""The ZeRO-3 hook's rank-major layout of a bucket, against ZeRO-3's own partitioning rule: parameter p
of n elements padded to N·ceil(n/N), rank r keeping elements [r·c, (r+1)·c) (DeepSpeed's
``_aligned_size`` and ``reduce_scatter_coalesced``), including parameters with fewer elements than ranks."""

from types import SimpleNamespace

import torch

from lightning_moo.strategies.zero3_hook import _RankMajor


def test_rank_major_blocks_hold_each_ranks_padded_chunks_in_parameter_order():
    world = 4
    sizes = [3, 1, 10, 8]  # 3 and 1 < 4 ranks: the last ranks' chunks of them are empty
    grads = [torch.arange(n, dtype=torch.float32) + 100 * k for k, n in enumerate(sizes)]
    params = [SimpleNamespace(ds_numel=n) for n in sizes]
    layout = _RankMajor(params, world)

    flat = torch.full((world * layout.block,), float("nan"))
    chunks = list(layout.chunks())
    assert len(chunks) == world * len(sizes)  # one piece per (rank, parameter), empty ones too
    for start, (k, lo, hi) in chunks:
        flat[start:start + hi - lo] = grads[k][lo:hi]

    # Independently: rank r's block is every parameter's r-th chunk of c = ceil(n / N), zero-padded.
    expected_blocks = []
    for r in range(world):
        block = []
        for g in grads:
            c = -(-g.numel() // world)
            part = g[r * c:(r + 1) * c]
            block.append(torch.cat([part, torch.full((c - part.numel(),), float("nan"))]))
        expected_blocks.append(torch.cat(block))
    torch.testing.assert_close(flat, torch.cat(expected_blocks), equal_nan=True)
    # Every rank owns a block of the same size: the sharded exchange's even slices.
    assert layout.block == sum(-(-n // world) for n in sizes)
    # Piece r·P + k is rank r's chunk of parameter k (what merging the records relies on).
    for i, (_, (k, _, _)) in enumerate(chunks):
        assert k == i % len(sizes)
