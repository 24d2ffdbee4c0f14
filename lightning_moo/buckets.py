"""What one gradient bucket holds, whatever engine formed it: its parameters, which rank keeps which
of its elements, and the record of its last solve.

An engine adapter (ZeRO-1/2's ``average_tensor``, DDP's comm hook, ...) describes each bucket it is
about to reduce as a :class:`Bucket` and hands it, with this rank's flat gradient, to the
:class:`~lightning_moo.reducer.BucketReducer`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

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


@dataclass(frozen=True)
class Bucket:
    """An engine's description of one bucket about to be reduced.

    ``params`` tile the bucket's flat gradient in order; ``owners`` say which rank keeps which
    elements after the reduction (ZeRO: the rank whose optimizer partition holds them; elements
    no segment covers need not be written). The reducer writes ``sum_t w_t g_t`` into every element
    this rank owns.
    """

    index: int
    params: tuple[ParamRange, ...]
    owners: tuple[Segment, ...]


@dataclass
class BucketInfo:
    """Monitoring record of one bucket for the last step that reduced it."""

    index: int
    params: tuple[ParamRange, ...]
    numel: int
    # On CPU once the backward is over (a bucket solved on a GPU keeps them there until then).
    gram: Tensor  # T×T float64
    weights: Tensor  # T float64
    step: int
    # P×T×T float64, one Gram per entry of ``params`` (they sum to ``gram``): what lets monitoring
    # aggregate exactly by layer or module kind when a bucket spans several.
    param_grams: Optional[Tensor] = None

    def per_parameter(self, params: tuple[ParamRange, ...], world: int) -> BucketInfo:
        """This record with pieces laid out rank-major (piece ``r·P + k`` is rank r's chunk of
        parameter k, as ZeRO-3 and FSDP shard a bucket) folded into one entry per parameter of
        ``params``, each Gram the sum over its chunks: a reshape, nothing read on the host."""
        grams = self.param_grams.view(world, len(params), *self.param_grams.shape[1:]).sum(0)
        return replace(self, params=tuple(params), numel=params[-1].end, param_grams=grams)


def even_segments(numel: int, world_size: int) -> list[Segment]:
    """Split ``numel`` elements into ``world_size`` contiguous, nearly equal segments (rank r owns the r-th)."""
    bounds = [numel * r // world_size for r in range(world_size + 1)]
    return [Segment(bounds[r], bounds[r + 1] - bounds[r], r) for r in range(world_size)]
