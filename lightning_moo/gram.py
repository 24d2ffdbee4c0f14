"""Parameter-sized kernels: the Gram matrix of T gradient slices and their weighted combination.

These are the only two operations that touch gradient-sized memory. Both take the T task
gradients of one bucket (or one slice of it) as a T×n matrix and accumulate in at least float32,
so bf16/fp16 gradients lose nothing extra in the inner products.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor


_CHUNK = 1 << 22  # columns upcast at a time for bf16/fp16 gradients (16 MiB per task in fp32)
_SPLIT_K_BLOCK = 1 << 16  # columns per block of the CUDA split-K Gram


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
    if grads.is_cuda and grads.shape[1] >= 2 * _SPLIT_K_BLOCK:
        return _gram_split_k(grads)
    return grads @ grads.T


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


def _gram_split_k(grads: Tensor) -> Tensor:
    """CUDA: a T×n by n×T product with n ≫ T runs on few SMs as one GEMM (measured 3.7× slower
    than this on an H200); split n into blocks, one small GEMM per block in a batch (strided
    views, no copy), then sum the block Grams."""
    T, n = grads.shape
    blocks = n // _SPLIT_K_BLOCK
    head = grads[:, : blocks * _SPLIT_K_BLOCK].view(T, blocks, _SPLIT_K_BLOCK).transpose(0, 1)
    with _full_precision_cuda_matmul():
        out = torch.bmm(head, head.transpose(1, 2)).sum(dim=0)
        tail = grads[:, blocks * _SPLIT_K_BLOCK :]
        return out + tail @ tail.T


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
