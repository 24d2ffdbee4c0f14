"""The replacement for ``DeepSpeedZeroOptimizer.average_tensor`` that runs a MOO solver per bucket."""

from __future__ import annotations

import torch
from torch import Tensor

from ..buckets import BucketInfo, ParamRange, bucket_layout, bucket_params, raise_non_finite
from ..exchange import Exchange
from ..solvers import MOOSolver


class ZeroBucketHook:
    """Installed as ``optimizer.average_tensor``: solves every bucket DeepSpeed hands to the reduction.

    DeepSpeed calls ``average_tensor(tensor, comm_dtype)`` with this rank's flat, unreduced gradient
    of one bucket and expects the reduced values in ``tensor`` (at least in this rank's partition).
    Instead of the average, this writes ``sum_t w_t g_t`` with ``w = solver(G)``.
    """

    def __init__(self, optimizer, solver: MOOSolver, exchange: Exchange, names: dict[int, str]) -> None:
        self.optimizer = optimizer
        self.solver = solver
        self.exchange = exchange
        self.names = names
        self.buckets: dict[int, BucketInfo] = {}
        self.step = 0
        self._next_index = 0
        # Several languages per rank: the gradients of all but the last, {id(param): gradient} each,
        # computed before the last language's backward reaches the buckets.
        self.languages_per_rank = 1
        self.stash: list[dict[int, Tensor]] = []
        self._stashed_rows: Tensor | None = None  # the current bucket's, for the non-finite report

    def start_step(self, step: int) -> None:
        """Number buckets from 0 again: bucket ids are the order of reduction within one (micro-)step."""
        self.step, self._next_index = step, 0
        self.stash = []

    def _others(self, comm_dtype: torch.dtype, like: Tensor):
        """This bucket's gradients of the rank's other languages, as rows in language order."""
        if self.languages_per_rank == 1:
            return None
        if len(self.stash) != self.languages_per_rank - 1:
            raise RuntimeError(
                f"this rank trains {self.languages_per_rank} languages but {len(self.stash)} gradients were "
                f"stashed before the last language's backward: call strategy.stash_gradient(loss) for each "
                f"of the first {self.languages_per_rank - 1}, then manual_backward(loss) for the last"
            )
        params = bucket_params(self.optimizer, comm_dtype)
        # Filled in place, each stashed gradient released once copied: a bucket as large as the
        # model (mode='global') then holds one copy of the other languages' gradients, not three.
        rows = torch.empty(len(self.stash), sum(p.numel() for p in params), dtype=like.dtype, device=like.device)
        for row, stashed in zip(rows, self.stash):
            offset = 0
            for p in params:
                g = stashed.pop(id(p))
                row[offset : offset + g.numel()].copy_(g.reshape(-1))
                offset += g.numel()
        self._stashed_rows = rows
        return rows

    def __call__(self, tensor: Tensor, communication_data_type: torch.dtype) -> None:
        if tensor.numel() == 0:
            return  # an empty bucket: nothing to reduce, as in stock DeepSpeed
        opt = self.optimizer
        self._comm_dtype = communication_data_type
        params, segments = bucket_layout(opt, communication_data_type, self.names)
        index, self._next_index = self._next_index, self._next_index + 1
        group = opt.dp_process_group
        work = tensor if tensor.dtype == communication_data_type else tensor.to(communication_data_type)

        def solve(g: Tensor) -> Tensor:
            if not bool(torch.isfinite(g).all()):
                return self._non_finite(index, params, tensor, g)
            return self.solver(g, bucket=index, step=self.step)

        with _reduction_stream(opt, communication_data_type):
            others = self._others(communication_data_type, work)
            piece_grams, w = self.exchange.reduce(work, segments, [(p.start, p.end) for p in params], solve, group, others)
            # Only the non-finite report inside reduce reads the rows: do not hold them past it.
            self._stashed_rows = others = None
            if work is not tensor:
                tensor.copy_(work)
            # bf16 params with fp32 gradient accumulation keep reduced gradients in a separate fp32
            # partition buffer; stock DeepSpeed fills it from the reduced bucket the same way.
            opt._add_full_reduction_to_compact_grad_partition(work, communication_data_type)
        if not bool(torch.isfinite(w).all()):
            return  # fp16 overflow: DeepSpeed skips this step; monitoring must not see its NaN Grams
        piece_grams = piece_grams.cpu()
        self.buckets[index] = BucketInfo(
            index, tuple(params), tensor.numel(), piece_grams.sum(0), w.detach().to("cpu", torch.float64), self.step, piece_grams
        )

    def _non_finite(self, index: int, params: list[ParamRange], tensor: Tensor, g: Tensor) -> Tensor:
        if self.optimizer.dynamic_loss_scale:
            # fp16 with dynamic loss scaling: let DeepSpeed see the overflow, skip the step and
            # lower the scale, exactly as it would for an averaged gradient.
            return torch.full((g.shape[0],), float("nan"), dtype=g.dtype, device=g.device)
        rows = self._stashed_rows if self.stash else None
        bad_here = [
            not bool(torch.isfinite(tensor[p.start : p.end]).all())
            or (rows is not None and not bool(torch.isfinite(rows[:, p.start : p.end]).all()))
            for p in params
        ]
        k, m = self.exchange.ranks_per_language, self.languages_per_rank

        def source(r: int) -> str:
            if m > 1:
                return f"rank {r} (languages {r * m}–{r * m + m - 1})"
            return f"rank {r} (language {r // k})" if k > 1 else f"language {r}"

        raise_non_finite("ZeRO", index, self.step, params, bad_here, tensor.device, self.optimizer.dp_process_group, source)


def _reduction_stream(opt, comm_dtype: torch.dtype):
    """The stream stock ``average_tensor`` reduces on, after the same waits (a no-op on CPU)."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if not opt.overlap_comm:
        return acc.stream(acc.current_stream())
    stream = opt.reduction_stream
    if not acc.resolves_data_dependency():
        bucket = opt.ipg_buckets[comm_dtype]
        for producer in bucket.copy_streams or {acc.current_stream()}:
            stream.wait_stream(producer)
        acc.current_stream().wait_stream(stream)
    return acc.stream(stream)
