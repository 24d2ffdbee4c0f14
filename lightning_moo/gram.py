"""Parameter-sized kernels: the Gram matrix of T gradient slices and their weighted combination.

These are the only two operations that touch gradient-sized memory. Both take the T task
gradients of one bucket (or one slice of it) as a T×n matrix and accumulate in at least float32,
so bf16/fp16 gradients lose nothing extra in the inner products.
"""

from __future__ import annotations

import torch
from torch import Tensor


_CHUNK = 1 << 22  # columns upcast at a time for bf16/fp16 gradients (16 MiB per task in fp32)


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
        return (grads @ grads.T).to(out_dtype)
    # Upcast half-precision gradients chunk by chunk: the inner products need fp32 accumulation
    # and rounding, but a full fp32 copy of a large bucket would cost T×n×4 bytes.
    out = torch.zeros(grads.shape[0], grads.shape[0], dtype=acc, device=grads.device)
    for chunk in grads.split(_CHUNK, dim=1):
        c = chunk.to(acc)
        out.addmm_(c, c.T)
    return out.to(out_dtype)


def combine(weights: Tensor, grads: Tensor, out: Tensor | None = None) -> Tensor:
    """The update ``sum_t weights[t] * grads[t]`` of a T×n matrix of gradients, in grads' dtype."""
    if grads.ndim != 2 or weights.shape != (grads.shape[0],):
        raise ValueError(f"weights {tuple(weights.shape)} do not match gradients {tuple(grads.shape)}")
    acc = _accumulation_dtype(grads.dtype)
    w = weights.to(device=grads.device, dtype=acc)
    if out is None:
        out = torch.empty(grads.shape[1], dtype=grads.dtype, device=grads.device)
    for lo in range(0, grads.shape[1], _CHUNK):
        hi = min(lo + _CHUNK, grads.shape[1])
        out[lo:hi].copy_(w @ grads[:, lo:hi].to(acc))
    return out
