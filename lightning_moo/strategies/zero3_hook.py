"""The ZeRO-3 adapter: the reduce-scatter of each of ZeRO-3's gradient buckets handed to the bucket reducer."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..buckets import Bucket, ParamRange, Segment
from ..exchange import PieceRows
from .zero_hook import DeepSpeedBucketHook


class Zero3BucketHook(DeepSpeedBucketHook):
    """Installed in place of ZeRO-3's ``__avg_scatter_grads`` (and of its all-reduce variant): each rank
    still holds its language's whole gradient of every parameter in the bucket; stock ZeRO-3 averages
    them and keeps this rank's partition of each parameter. Here the reducer writes ``sum_t w_t g_t``
    into the elements this rank keeps, and the hook hands them back as those partitions.

    ZeRO-3 partitions each parameter on its own: ``numel`` elements padded to ``N·c`` with
    ``c = ceil(numel / N)``, rank r keeping ``[r·c, (r + 1)·c)``. The reducer gets the bucket laid out
    rank-major, as stock's reduce-scatter lays it out: rank 0's chunk of every parameter (padded to
    ``c``), then rank 1's, ... Each rank then owns one contiguous block of the same size, exactly the
    sharded exchange's even slice, so its second all-to-all moves nothing and the communication is
    stock's reduce-scatter plus the T×T Grams. Monitoring sees each parameter once, with its Gram
    summed over its chunks.
    """

    def scatter(self, params: list[Tensor], communication_data_type: torch.dtype, padded: bool) -> list[Tensor]:
        """This rank's combined partition of each of ``params`` (their ``.grad`` hold this rank's
        language's gradients), in ``gradient_accumulation_dtype``; ``padded``: at the parameter's full
        partition size, zeros past its last element (the all-reduce variant's shape)."""
        group = self.reducer.group
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        layout = _RankMajor(params, world)
        # Stock's reduce-scatter builds the same rank-major copy, so this is no memory beyond stock.
        flat = torch.zeros(world * layout.block, dtype=communication_data_type, device=params[0].grad.device)
        for start, (k, lo, hi) in layout.chunks():
            flat[start: start + hi - lo].copy_(params[k].grad.reshape(-1)[lo:hi])
        bucket = self._describe(params, layout)
        others = self._stashed_rows_rank_major(params, layout, flat)
        self.reducer.reduce(flat, bucket, others)
        del others
        self._merge_record(bucket.index, params, layout)

        accumulation = self.optimizer.gradient_accumulation_dtype
        mine = flat[rank * layout.block: (rank + 1) * layout.block]
        out = []
        for k, p in enumerate(params):
            start = layout.offsets[k]
            length = layout.chunk[k] if padded else max(0, min(layout.chunk[k], p.ds_numel - rank * layout.chunk[k]))
            out.append(mine[start: start + length].to(accumulation))  # padding is Σ w_t · 0 = 0
        return out

    def _describe(self, params: list[Tensor], layout: "_RankMajor") -> Bucket:
        """Every chunk is a piece, empty ones too (the last ranks' chunks of a parameter with fewer than N
        elements), so that piece ``r·P + k`` is rank r's chunk of parameter k; padding stays out of the
        Grams; rank r owns block r."""
        ranges = [
            ParamRange(self._name(params[k], k), start, start + hi - lo) for start, (k, lo, hi) in layout.chunks()
        ]
        owners = [Segment(r * layout.block, layout.block, r) for r in range(layout.world)]
        return Bucket(self._next_bucket_index(), tuple(ranges), tuple(owners))

    def _name(self, param: Tensor, k: int) -> str:
        return self.names.get(id(param), f"<unnamed param {k}>")

    def _stashed_rows_rank_major(self, params: list[Tensor], layout: "_RankMajor", like: Tensor) -> Optional[PieceRows]:
        """The rank's other languages' gradients of this bucket, as pieces in the rank-major layout
        (chunks of the stashed gradients, zeros for the padding)."""
        stashed = self._stashed_rows(params)
        if stashed is None:
            return None
        zeros = like.new_zeros(max(layout.chunk))
        rows = []
        for pieces in stashed.rows:  # one language: one (offset, gradient) piece per parameter, in order
            grads = [g for _, g in pieces]
            row, end = [], 0
            for start, (k, lo, hi) in layout.chunks():
                if start > end:
                    row.append((end, zeros[: start - end]))
                row.append((start, grads[k][lo:hi]))
                end = start + hi - lo
            if end < like.numel():
                row.append((end, zeros[: like.numel() - end]))
            rows.append(row)
        return PieceRows(rows)

    def _merge_record(self, index: int, params: list[Tensor], layout: "_RankMajor") -> None:
        """The reducer recorded one entry per chunk; monitoring wants one per parameter, at its
        place in the bucket's parameter order (its Gram the sum over its chunks)."""
        info = self.reducer.buckets.get(index)
        if info is None:  # a skipped (overflowed) step keeps no records
            return
        ranges, offset = [], 0
        for k, p in enumerate(params):
            ranges.append(ParamRange(self._name(p, k), offset, offset + p.ds_numel))
            offset += p.ds_numel
        self.reducer.buckets[index] = info.per_parameter(tuple(ranges), layout.world)


class _RankMajor:
    """ZeRO-3's partitioning of a bucket's parameters, laid out rank-major: block r holds rank r's
    chunk of every parameter, parameter k's at ``offsets[k]``, each ``chunk[k]`` long (padded)."""

    def __init__(self, params: list[Tensor], world: int) -> None:
        self.params, self.world = params, world
        self.chunk = [math.ceil(p.ds_numel / world) for p in params]
        self.offsets = [sum(self.chunk[:k]) for k in range(len(params))]
        self.block = sum(self.chunk)

    def chunks(self):
        """``(start in the flat bucket, (parameter index, first element, end element))`` for every
        chunk, rank by rank, in flat order (empty where a parameter has fewer than N elements)."""
        for r in range(self.world):
            for k, p in enumerate(self.params):
                lo, hi = min(r * self.chunk[k], p.ds_numel), min((r + 1) * self.chunk[k], p.ds_numel)
                yield r * self.block + self.offsets[k], (k, lo, hi)
