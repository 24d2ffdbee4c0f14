"""The two parameter-sized kernels against plain float64 arithmetic."""

from __future__ import annotations

import warnings

import pytest
import torch

from lightning_moo import gram as kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_gram_and_combine_match_float64(dtype, monkeypatch):
    monkeypatch.setattr(kernels, "_CHUNK", 7)  # force several chunks
    g = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)).to(dtype)
    ref = g.double()
    G = kernels.gram(g)
    assert G.dtype == torch.float64
    # float32 accumulation: relative error of a few float32 ulps on each inner product.
    torch.testing.assert_close(G, ref @ ref.T, rtol=1e-5, atol=1e-5 * float((ref @ ref.T).abs().max()))
    w = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=torch.float64)
    d = kernels.combine(w, g)
    assert d.dtype == dtype
    torch.testing.assert_close(d.double(), w @ ref, rtol=2 * torch.finfo(dtype).eps, atol=2 * torch.finfo(dtype).eps * 4)


def test_gram_splits_over_slices():
    """The Gram of a bucket is the sum of the Grams of its slices (what the sharded exchange relies on)."""
    g = torch.randn(3, 101, dtype=torch.float64)
    parts = sum(kernels.gram(s) for s in g.split(17, dim=1))
    torch.testing.assert_close(parts, kernels.gram(g))


def test_combine_writes_in_place():
    g = torch.randn(2, 10)
    out = torch.empty(10)
    assert kernels.combine(torch.tensor([1.0, 1.0]), g, out=out) is out
    torch.testing.assert_close(out, g.sum(0))


@pytest.mark.parametrize("T", [2, 4])
def test_combine_into_a_slice_is_the_exact_mean_and_leaves_the_rest(T):
    """The exchanges combine into a slice of a larger buffer: only the slice changes, with no
    warning about resizing it, and uniform weights 1/T (powers of two) give the bits of
    ``sum / T``, the average stock data parallelism takes."""
    g = torch.randn(T, 1000, generator=torch.Generator().manual_seed(T))
    big = torch.full((3000,), 7.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels.combine(torch.full((T,), 1 / T, dtype=torch.float64), g, out=big[1000:2000])
    assert torch.equal(big[1000:2000], g.sum(0) / T)
    assert (big[:1000] == 7.0).all() and (big[2000:] == 7.0).all()


def test_shape_errors():
    with pytest.raises(ValueError, match="T×n"):
        kernels.gram(torch.ones(3))
    with pytest.raises(ValueError, match="do not match"):
        kernels.combine(torch.ones(3), torch.ones(2, 4))


@pytest.mark.parametrize("n", [64, 100, 129])
def test_split_k_gram_matches_float64(n, monkeypatch):
    """The CUDA split-K path's arithmetic (strided block views + tail), run on the CPU."""
    g = torch.randn(5, n, dtype=torch.float64)
    torch.testing.assert_close(kernels._blocked_piece_grams(g, [(0, n)], 16)[0], g @ g.T)


# Bucket element ranges of parameters against a slice holding elements [first, first + m): pieces
# before, inside one block, across many blocks, ending in the slice's ragged tail, after, empty.
PIECES = [(0, 10), (10, 14), (14, 15), (15, 41), (41, 90), (90, 137), (137, 200), (200, 200), (200, 260)]


@pytest.mark.parametrize("first, m, block", [(0, 137, 8), (12, 150, 7), (40, 97, 16), (0, 260, 64), (30, 20, 8)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_piece_grams_through_one_batched_product_match_float64(first, m, block, dtype):
    """The CUDA path (one product over the slice's blocks, whole blocks summed per piece, ragged ends
    added) on the CPU, against each piece's Gram in float64 from the columns themselves."""
    g = torch.randn(4, m, generator=torch.Generator().manual_seed(m)).to(dtype)
    ref = torch.zeros(len(PIECES), 4, 4, dtype=torch.float64)
    for k, (start, end) in enumerate(PIECES):
        part = g.double()[:, max(start, first) - first : max(min(end, first + m) - first, 0)]
        ref[k] = part @ part.T
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for block_size in (block, None):  # the batched product, and the CPU default (one GEMM per piece)
        got = kernels.piece_grams(g, first, PIECES, block=block_size)
        assert got.dtype == torch.float64 and got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol * float(ref.abs().max()))
