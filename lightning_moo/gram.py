"""Parameter-sized kernels: the Gram matrix of T gradient slices and their weighted combination.

These are the only two operations that touch gradient-sized memory. Both take the T task
gradients of one bucket (or one slice of it) as a T×n matrix and accumulate in at least float32,
so bf16/fp16 gradients lose nothing extra in the inner products.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import Tensor


_CHUNK = 1 << 22  # columns upcast at a time for bf16/fp16 gradients (16 MiB per task in fp32)
_SPLIT_K_BLOCK = 1 << 16  # columns per block of the batched CUDA Gram


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def gram(grads: Tensor, out_dtype: torch.dtype = torch.float64) -> Tensor:
    """T×T Gram matrix ``grads @ grads.T`` of a T×n matrix of gradients.

    Inner products split over any slicing of the n columns, so summing the Grams of the slices
    (e.g. an all-reduce across ranks that each hold 1/N of a bucket) gives the bucket's Gram.
    """
    if grads.ndim != 2:
        raise ValueError(f"expected a T×n matrix of task gradients, got shape {tuple(grads.shape)}")
    acc = _accumulation_dtype(grads.dtype)
    if grads.dtype == acc:
        return _gram_full_precision(grads).to(out_dtype)
    # Upcast half-precision gradients chunk by chunk: the inner products need fp32 accumulation
    # and rounding, but a full fp32 copy of a large bucket would cost T×n×4 bytes. (A bf16 bmm
    # with out_dtype=fp32 measured 2.7e-4 relative error on an H200: it rounds through bf16.)
    out = torch.zeros(grads.shape[0], grads.shape[0], dtype=acc, device=grads.device)
    for chunk in grads.split(_CHUNK, dim=1):
        out += _gram_full_precision(chunk.to(acc))
    return out.to(out_dtype)


def _gram_full_precision(grads: Tensor) -> Tensor:
    block = _block_size(grads)
    if block:
        return _blocked_piece_grams(grads, [(0, grads.shape[1])], block)[0]
    return grads @ grads.T


def _block_size(columns: Tensor) -> int:
    """Columns per block of the batched CUDA product for float32/float64 ``columns``, 0 for one GEMM:
    a T×n by n×T product with n ≫ T runs on few SMs as one GEMM (measured 3.7× slower than the
    batched product on an H200). CPU GEMMs need no such help."""
    if columns.is_cuda and columns.dtype in (torch.float32, torch.float64) and columns.shape[1] >= 2 * _SPLIT_K_BLOCK:
        return _SPLIT_K_BLOCK
    return 0


def piece_grams(columns: Tensor, first: int, pieces: Sequence[tuple[int, int]], block: int | None = None) -> Tensor:
    """P×T×T float64 Grams of the parts of ``pieces`` (bucket element ranges, one per parameter) that
    fall in ``columns``, a T×m block holding bucket elements ``[first, first + m)``; zero for pieces
    outside it.

    On CUDA (``block``: by default :func:`_block_size`) one batched product over all of ``columns``
    gives the Gram of every block of columns, and each piece sums its whole blocks and adds the Grams
    of its ragged ends. A product per parameter, a few million columns each, is the likely reason the
    H200 profile in ``benchmarks/results/gpu_no_stall.md`` found the Grams at ~0.25 TB/s, where one
    over a whole bucket ran at ~1.6 TB/s (``solver_speed_cuda_float32.md``); ``gpu_no_stall.py``
    times both ways.
    """
    T, m = columns.shape
    ranges = [(max(start, first) - first, min(end, first + m) - first) for start, end in pieces]
    block = _block_size(columns) if block is None else block
    if block:
        return _blocked_piece_grams(columns, ranges, block).to(torch.float64)
    out = torch.zeros(len(pieces), T, T, dtype=torch.float64, device=columns.device)
    for k, (a, b) in enumerate(ranges):
        if a < b:
            out[k] = gram(columns[:, a:b])
    return out


@contextmanager
def _full_precision_cuda_matmul():
    """No TF32 inside cuBLAS for the Gram, whatever the user set globally for speed: TF32's 10-bit
    mantissa would leave ~1e-3 relative error in the inner products."""
    flags = torch.backends.cuda.matmul
    saved, flags.allow_tf32 = flags.allow_tf32, False
    try:
        yield
    finally:
        flags.allow_tf32 = saved


def _blocked_piece_grams(columns: Tensor, ranges: Sequence[tuple[int, int]], block: int) -> Tensor:
    """:func:`piece_grams` through one batched product of ``block``-column blocks (strided views, no
    copy), in ``columns``' dtype; ``ranges`` are column ranges of ``columns`` (empty: a zero Gram)."""
    T, m = columns.shape
    count = m // block
    whole = columns[:, : count * block].view(T, count, block).transpose(0, 1)
    out = torch.zeros(len(ranges), T, T, dtype=columns.dtype, device=columns.device)
    with _full_precision_cuda_matmul():
        block_grams = torch.bmm(whole, whole.transpose(1, 2))
        for k, (a, b) in enumerate(ranges):
            if a >= b:
                continue
            lo, hi = -(-a // block), min(b // block, count)  # the whole blocks inside [a, b)
            ends = [(a, b)]
            if lo < hi:
                torch.sum(block_grams[lo:hi], dim=0, out=out[k])
                ends = [(a, lo * block), (hi * block, b)]
            for x, y in ends:
                if x < y:
                    out[k].addmm_(columns[:, x:y], columns[:, x:y].T)
    return out


def combine(weights: Tensor, grads: Tensor, out: Tensor | None = None) -> Tensor:
    """The update ``sum_t weights[t] * grads[t]`` of a T×n matrix of gradients, in grads' dtype."""
    if grads.ndim != 2 or weights.shape != (grads.shape[0],):
        raise ValueError(f"weights {tuple(weights.shape)} do not match gradients {tuple(grads.shape)}")
    acc = _accumulation_dtype(grads.dtype)
    w = weights.to(device=grads.device, dtype=acc)
    if out is None:
        out = torch.empty(grads.shape[1], dtype=grads.dtype, device=grads.device)
    if grads.dtype == acc:
        # Straight into ``out``: a temporary of n elements per call (fresh pages on CPU) measured
        # 2-3x the product itself at T = 2; the same kernel, so the same bits.
        return torch.mv(grads.T, w, out=out)  # ``torch.matmul(w, grads, out=)`` would warn: it resizes ``out`` to 1×n
    for lo in range(0, grads.shape[1], _CHUNK):
        hi = min(lo + _CHUNK, grads.shape[1])
        out[lo:hi].copy_(w @ grads[:, lo:hi].to(acc))
    return out
