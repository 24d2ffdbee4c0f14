"""The ZeRO-1/2 adapter: ``DeepSpeedZeroOptimizer.average_tensor`` handed to the bucket reducer; what
it shares with the ZeRO-3 adapter (bucket numbering, the stashed gradients of a rank's other languages)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..buckets import Bucket, ParamRange, Segment
from ..exchange import PieceRows
from ..reducer import BucketReducer
from .. import _compat


def full_numel(param: Tensor) -> int:
    """A parameter's number of elements; ZeRO-3 keeps a partitioned one's in ``ds_numel`` (its own
    storage is then empty)."""
    return int(getattr(param, "ds_numel", param.numel()))


class DeepSpeedBucketHook:
    """What a DeepSpeed ZeRO adapter keeps between buckets: buckets are numbered in reduction order
    within a (micro-)step, and a rank with several languages stashes all but the last one's gradients."""

    def __init__(self, optimizer, reducer: BucketReducer, names: dict[int, str]) -> None:
        self.optimizer, self.reducer, self.names = optimizer, reducer, names
        self._next_index = 0
        # Several languages per rank: the gradients of all but the last, {id(param): gradient} each,
        # computed before the last language's backward reaches the buckets.
        self.stash: list[dict[int, Tensor]] = []

    @property
    def buckets(self):
        return self.reducer.buckets

    def start_step(self, step: int) -> None:
        self.reducer.start_step(step)
        self._next_index = 0
        self.stash = []

    def _next_bucket_index(self) -> int:
        index, self._next_index = self._next_index, self._next_index + 1
        return index

    def _stashed_rows(self, params: list[Tensor]) -> Optional[PieceRows]:
        """This bucket's gradients of the rank's other languages, in language order, as the stashed
        per-parameter pieces: the exchange copies them once, straight into what it sends."""
        m = self.reducer.layout.languages_per_rank
        if m == 1:
            return None
        if len(self.stash) != m - 1:
            raise RuntimeError(
                f"this rank trains {m} languages but {len(self.stash)} gradients were stashed before the last "
                f"language's backward: call strategy.stash_gradient(loss) for each of the first {m - 1}, then "
                "manual_backward(loss) for the last"
            )
        rows = []
        for stashed in self.stash:
            # Popped: once this bucket is reduced nothing holds its stashed gradients (mode='global': the
            # whole model's), so the stash shrinks bucket by bucket.
            pieces, offset = [], 0
            for p in params:
                pieces.append((offset, stashed.pop(id(p)).reshape(-1)))
                offset += full_numel(p)
            rows.append(pieces)
        return PieceRows(rows)


class ZeroBucketHook(DeepSpeedBucketHook):
    """Installed as ``optimizer.average_tensor``: describes each bucket DeepSpeed reduces and lets the
    reducer combine it.

    DeepSpeed calls ``average_tensor(tensor, comm_dtype)`` with this rank's flat, unreduced gradient
    of one bucket and keeps only this rank's partition of the result; the reducer writes
    ``sum_t w_t g_t`` there instead of the average.
    """

    def __call__(self, tensor: Tensor, communication_data_type: torch.dtype) -> None:
        if tensor.numel() == 0:
            return  # an empty bucket: nothing to reduce, as in stock DeepSpeed
        opt = self.optimizer
        members = _compat.zero_bucket(opt, communication_data_type)
        bucket = self._describe(members)
        work = tensor if tensor.dtype == communication_data_type else tensor.to(communication_data_type)
        with _compat.reduction_stream(opt, communication_data_type):
            others = self._stashed_rows([p for p, _ in members])
            self.reducer.reduce(work, bucket, others)
            del others  # a bucket as large as the model (mode='global') must not outlive its reduction
            if work is not tensor:
                tensor.copy_(work)
            _compat.add_full_reduction_to_partition(opt, work, communication_data_type)

    def _describe(self, members) -> Bucket:
        """The bucket's parameters and owners from ZeRO's bookkeeping: a parameter occupies ``numel``
        consecutive elements and is split at each partition's start."""
        params, owners, offset = [], [], 0
        for param, starts in members:
            numel = param.numel()
            for k, (start, owner) in enumerate(starts):
                end = starts[k + 1][0] if k + 1 < len(starts) else numel
                owners.append(Segment(offset + start, end - start, owner))
            params.append(ParamRange(self.names.get(id(param), f"<unnamed param {len(params)}>"), offset, offset + numel))
            offset += numel
        return Bucket(self._next_bucket_index(), tuple(params), tuple(owners))
