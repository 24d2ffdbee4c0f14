"""What one ZeRO gradient bucket holds: its parameters, which rank owns which elements, its last solve.

DeepSpeed ZeRO-1/2 reduces gradients bucket by bucket through
``DeepSpeedZeroOptimizer.average_tensor(tensor, dtype)``; ``tensor`` is this rank's flat gradient of
the parameters in ``optimizer.ipg_buckets[dtype].params``, in that order. Every element of it
belongs to exactly one rank's optimizer partition; that rank is the only one whose reduced values
DeepSpeed keeps. This module reads both facts from the optimizer's own bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NoReturn, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class ParamRange:
    """One parameter inside a bucket: elements ``[start, end)`` of the bucket's flat gradient."""

    name: str
    start: int
    end: int


@dataclass(frozen=True)
class Segment:
    """Elements ``[start, start + length)`` of a bucket, owned by rank ``owner`` of the data-parallel group."""

    start: int
    length: int
    owner: int


@dataclass
class BucketInfo:
    """Monitoring record of one bucket for the last step that reduced it."""

    index: int
    params: tuple[ParamRange, ...]
    numel: int
    gram: Tensor  # T×T float64, on CPU
    weights: Tensor  # T float64, on CPU
    step: int
    # P×T×T float64 on CPU, one Gram per entry of ``params`` (they sum to ``gram``): what lets
    # monitoring aggregate exactly by layer or module kind when a bucket spans several.
    param_grams: Optional[Tensor] = None


def bucket_layout(optimizer, comm_dtype: torch.dtype, names: dict[int, str]) -> tuple[list[ParamRange], list[Segment]]:
    """Parameters and ownership segments of the bucket ``optimizer`` is about to reduce.

    Mirrors the offsets ``DeepSpeedZeroOptimizer.average_tensor`` computes: a parameter occupies
    ``numel`` consecutive elements, and a parameter that straddles partitions is split at each
    partition's ``grad_start_offset``.
    """
    bucket = optimizer.ipg_buckets[comm_dtype]
    if bucket.has_moe_params:
        raise NotImplementedError("bucket-level MOO does not support mixture-of-experts parameter groups")
    params, segments, offset = [], [], 0
    for group, index, param_id in bucket.params:
        param = optimizer.bit16_groups[group][index]
        numel = param.numel()
        starts = sorted(
            (int(optimizer.grad_start_offset[group][pid][param_id]), int(pid))
            for pid in optimizer.param_to_partition_ids[group][param_id]
        )
        for k, (start, owner) in enumerate(starts):
            end = starts[k + 1][0] if k + 1 < len(starts) else numel
            segments.append(Segment(offset + start, end - start, owner))
        params.append(ParamRange(names.get(id(param), f"<unnamed param {param_id}>"), offset, offset + numel))
        offset += numel
    return params, segments


def bucket_params(optimizer, comm_dtype: torch.dtype) -> list[Tensor]:
    """The parameters of the bucket ``optimizer`` is about to reduce, in the bucket's order."""
    return [optimizer.bit16_groups[g][i] for g, i, _ in optimizer.ipg_buckets[comm_dtype].params]


def even_segments(numel: int, world_size: int) -> list[Segment]:
    """Split ``numel`` elements into ``world_size`` contiguous, nearly equal segments (rank r owns the r-th)."""
    bounds = [numel * r // world_size for r in range(world_size + 1)]
    return [Segment(bounds[r], bounds[r + 1] - bounds[r], r) for r in range(world_size)]


def raise_non_finite(
    kind: str,
    index: int,
    step: int,
    params: Sequence[ParamRange],
    bad_here: Sequence[bool],
    device: torch.device,
    group=None,
    source: Callable[[int], str] = lambda rank: f"language {rank}",
) -> NoReturn:
    """Name the ranks and parameters with a non-finite gradient in a bucket, then raise.

    Every rank reaches this together (the bucket's Gram is all-reduced, so all see it non-finite),
    so the all-gather of the per-parameter flags cannot hang. ``bad_here[i]``: parameter i is
    non-finite on this rank; ``source(rank)`` says which language(s) a rank trains.
    """
    flags = torch.tensor(list(bad_here), dtype=torch.uint8, device=device)  # NCCL gathers device tensors only
    every = [torch.empty_like(flags) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, flags, group=group)
    bad = [f"{source(r)}: {p.name}" for r, f in enumerate(every) for p, b in zip(params, f.tolist()) if b]
    raise FloatingPointError(
        f"non-finite gradient in {kind} bucket {index} at step {step} "
        f"(parameters {[p.name for p in params]}): {'; '.join(bad)}. "
        "Check those languages' losses and inputs, lower the learning rate, or use fp16 loss scaling."
    )
