"""The ZeRO-3 adapter: the reduce-scatter of each of ZeRO-3's gradient buckets handed to the bucket reducer."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from ..buckets import Bucket, ParamRange, Segment
from .zero_hook import DeepSpeedBucketHook


class Zero3BucketHook(DeepSpeedBucketHook):
    """Installed in place of ZeRO-3's ``__avg_scatter_grads`` (and of its all-reduce variant): each rank
    still holds its language's whole gradient of every parameter in the bucket; stock ZeRO-3 averages
    them and keeps this rank's partition of each parameter. Here the reducer writes ``sum_t w_t g_t``
    into the elements this rank keeps, and the hook hands them back as those partitions.

    ZeRO-3 partitions each parameter on its own: ``numel`` elements padded to a multiple of the world
    size N, rank r keeping ``[r·c, (r + 1)·c)`` with ``c = ceil(numel / N)`` (ranks past the end keep
    only padding). A bucket is the parameters ZeRO-3 reduces together, in the order it passes them.
    """

    def scatter(self, params: list[Tensor], communication_data_type: torch.dtype, padded: bool) -> list[Tensor]:
        """This rank's combined partition of each of ``params`` (their ``.grad`` hold this rank's
        language's gradients), in ``gradient_accumulation_dtype``; ``padded``: each partition at the
        parameter's full partition size, zeros past its last element (the all-reduce variant's shape)."""
        opt = self.optimizer
        # The one extra bucket of memory: ZeRO-3's gradients of a bucket need not lie side by side.
        flat = torch.empty(sum(p.ds_numel for p in params), dtype=communication_data_type, device=params[0].grad.device)
        offset = 0
        for p in params:
            flat[offset: offset + p.ds_numel].copy_(p.grad.reshape(-1))
            offset += p.ds_numel
        bucket = self._describe_partitions(params)
        others = self._stashed_rows(params)
        self.reducer.reduce(flat, bucket, others)
        del others

        rank, world = dist.get_rank(self.reducer.group), dist.get_world_size(self.reducer.group)
        out, offset = [], 0
        for p in params:
            numel, chunk = p.ds_numel, math.ceil(p.ds_numel / world)
            start, end = min(rank * chunk, numel), min((rank + 1) * chunk, numel)
            part = flat[offset + start: offset + end].to(opt.gradient_accumulation_dtype)
            if padded and part.numel() != p.partition_numel():
                full = torch.zeros(p.partition_numel(), dtype=part.dtype, device=part.device)
                full[: part.numel()] = part
                part = full
            out.append(part)
            offset += numel
        return out

    def _describe_partitions(self, params: list[Tensor]) -> Bucket:
        world = dist.get_world_size(self.reducer.group)
        ranges, owners, offset = [], [], 0
        for k, p in enumerate(params):
            numel, chunk = p.ds_numel, math.ceil(p.ds_numel / world)
            for r in range(world):
                start, end = min(r * chunk, numel), min((r + 1) * chunk, numel)
                if end > start:
                    owners.append(Segment(offset + start, end - start, r))
            ranges.append(ParamRange(self.names.get(id(p), f"<unnamed param {k}>"), offset, offset + numel))
            offset += numel
        return Bucket(self._next_bucket_index(), tuple(ranges), tuple(owners))
