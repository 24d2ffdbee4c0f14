"""How many buckets bucket-level MOO gets: a target count as a knob, a warning when there are few.

With few trainable parameters (a LoRA adapter: a few million even for a 70B model) the engines'
default bucket sizes put every gradient in one bucket, and bucket-level MOO silently becomes global
MOO. ``target_buckets`` derives the bucket size from the trainable parameter count instead.
"""

from __future__ import annotations

import math

from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

# Fewer buckets per step than this: the run is close to global MOO and is told so.
FEW_BUCKETS = 4


def trainable_numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def bucket_numel_for(module: nn.Module, target_buckets: int) -> int:
    """Elements per bucket so that the trainable parameters fill about ``target_buckets`` buckets
    (engines close a bucket at a parameter's boundary, so a few more may form)."""
    if target_buckets < 1:
        raise ValueError(f"target_buckets must be a positive number of buckets, got {target_buckets}")
    return max(1, math.ceil(trainable_numel(module) / target_buckets))


def warn_if_few_buckets(count: int, module: nn.Module, setting: str) -> None:
    """Warn (once, rank zero) when a step reduced fewer than ``FEW_BUCKETS`` buckets."""
    if count >= FEW_BUCKETS:
        return
    rank_zero_warn(
        f"bucket-level MOO ran on {count} bucket(s) per step ({trainable_numel(module):,} trainable elements, "
        f"{setting}): with so few buckets it is close to global MOO (mode='global'). For per-bucket weights set "
        f"strategy.target_buckets (e.g. 16), which sizes the buckets from the trainable parameter count."
    )
