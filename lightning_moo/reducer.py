"""One engine-independent bucket reduction: exchange, Grams, solver, combination, record.

An engine adapter (the ZeRO-1/2 hook, the DDP comm hook, ...) finds this rank's rows of one bucket
and describes the bucket (:class:`~lightning_moo.buckets.Bucket`); :meth:`BucketReducer.reduce` does
the rest the same way for every engine:

1. the exchange gathers what it needs and all-reduces one T×T Gram per parameter;
2. the solver maps their sum (the bucket's Gram) to weights, unless the Gram is non-finite: then
   fp16 loss scaling gets NaN weights (the engine skips the step and lowers the scale, as after stock
   averaging) and otherwise every rank raises, naming the ranks, languages and parameters at fault;
3. the exchange writes ``sum_t w_t g_t`` into the elements this rank owns;
4. a :class:`~lightning_moo.buckets.BucketInfo` records the bucket for monitoring.

On CUDA a host solver stalls the thread that launches the backward's kernels: the Gram must reach
the host, so everything queued before it must finish. With ``on_device`` a solver that can solve on
the device (``solver.weights_on_device``, e.g. MGDA for T ≤ 12) does, and nothing in the reduction
waits for the device: non-finite Grams and the monitoring records are dealt with once per backward,
in :meth:`BucketReducer.check_step`, which the engine calls after the backward and before the step.
"""

from __future__ import annotations

from typing import NoReturn, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .buckets import Bucket, BucketInfo, ParamRange
from .exchange import Exchange, PieceRows
from .layout import LanguageLayout
from .solvers import MOOSolver


class BucketReducer:
    """Reduces the buckets of one run with one solver, exchange and language layout.

    Args:
        solver: maps each bucket's T×T Gram to T weights.
        exchange: how the ranks' rows meet (``sharded`` or ``allgather``).
        layout: which rank trains which language.
        engine: a word for messages ("ZeRO", "DDP").
        loss_scaling: fp16 with dynamic loss scaling, where a non-finite gradient is an overflow the
            engine skips, not an error.
        group: the data-parallel process group (default: the world).
        on_device: solve on the gradients' device where the solver can (see above): ``None`` when the
            gradients are on CUDA, ``True`` on any device (the CPU proofs of that path), ``False``
            never. Unless False the engine must call :meth:`check_step` after every backward.
    """

    def __init__(
        self,
        solver: MOOSolver,
        exchange: Exchange,
        layout: LanguageLayout,
        engine: str,
        loss_scaling: bool = False,
        group=None,
        on_device: Optional[bool] = False,
    ) -> None:
        self.solver, self.exchange, self.layout = solver, exchange, layout
        self.on_device = on_device
        # Buckets solved on the device this backward, with their piece Grams: checked by check_step.
        self._unchecked: list[tuple[Bucket, Tensor]] = []
        self.engine, self.loss_scaling, self.group = engine, loss_scaling, group
        self.buckets: dict[int, BucketInfo] = {}
        self.step = -1
        self.losses: Optional[Tensor] = None  # each language's loss this step, for solvers that need them
        self._skipped = False  # this step overflowed: the engine skips it, monitoring must not see its NaN Grams

    def start_step(self, step: int) -> None:
        """A new optimizer step forgets the last one's records (an engine may rebuild its buckets, so an
        index need not name the same parameters from one step to the next)."""
        if step != self.step:
            self.step, self.buckets, self._skipped, self.losses = step, {}, False, None
            self._unchecked = []

    def reduce(self, tensor: Tensor, bucket: Bucket, others: Optional[PieceRows | Tensor] = None) -> Tensor:
        """Write the combination into this rank's elements of ``tensor`` (this rank's flat gradient of
        ``bucket``; ``others`` [m - 1, n]: its other languages' rows); return the weights."""

        on_device = self._solves_on_device(tensor)
        solved: list[Tensor] = []  # the bucket's Gram as the exchange summed it for the solver

        def solve(gram: Tensor) -> Tensor:
            solved.append(gram)
            if on_device:  # NaN weights for a non-finite Gram; check_step raises or skips after the backward
                self.solver.bucket, self.solver.step = bucket.index, self.step
                return self.solver.weights_on_device(gram).to(gram.dtype)
            if not bool(torch.isfinite(gram).all()):
                return self._non_finite(bucket, tensor, others, gram)
            return self.solver(gram, bucket=bucket.index, step=self.step, losses=self.losses)

        pieces = [(p.start, p.end) for p in bucket.params]
        piece_grams, w = self.exchange.reduce(tensor, bucket.owners, pieces, solve, self.layout, self.group, others)
        if on_device:
            self._unchecked.append((bucket, piece_grams))
            self.buckets[bucket.index] = BucketInfo(  # on the device until check_step
                bucket.index, bucket.params, tensor.numel(), solved[0], w.detach(), self.step, piece_grams
            )
        elif self._skipped:
            self.buckets = {}
        else:
            piece_grams = piece_grams.cpu()
            self.buckets[bucket.index] = BucketInfo(
                bucket.index, bucket.params, tensor.numel(), piece_grams.sum(0), w.detach().to("cpu", torch.float64),
                self.step, piece_grams,
            )
        return w

    def _solves_on_device(self, tensor: Tensor) -> bool:
        if self.on_device is False or (self.on_device is None and not tensor.is_cuda):
            return False
        return self.solver.supports_on_device(self.layout.num_languages)

    def check_step(self) -> None:
        """After a backward: the buckets solved on the device are checked (one wait for the device
        per backward) and their records moved to the host. A non-finite Gram raises on every rank,
        naming the languages and parameters whose Gram diagonal is non-finite, or, under fp16 loss
        scaling, leaves the skip to the engine (its weights were NaN, so is the gradient)."""
        if not self._unchecked:
            return
        pending, self._unchecked = self._unchecked, []
        # One device-to-host copy of every flag and record (all float64): a copy per tensor would wait on the
        # device each time (67 waits per step instead of 1 for 22 buckets on an H200, gpu_no_stall.md).
        infos = [self.buckets[bucket.index] for bucket, _ in pending if bucket.index in self.buckets]
        records = [t for info in infos for t in (info.gram, info.weights, info.param_grams) if t is not None]
        parts = [t.reshape(-1).to(torch.float64) for t in [torch.isfinite(g).all() for _, g in pending] + records]
        host = iter(torch.cat(parts).cpu().split([p.numel() for p in parts]))
        finite = torch.cat([next(host) for _ in pending]).bool()
        for info in infos:
            info.gram, info.weights = next(host).view(info.gram.shape), next(host).view(info.weights.shape)
            if info.param_grams is not None:
                info.param_grams = next(host).view(info.param_grams.shape)
        if bool(finite.all()):
            return
        if self.loss_scaling:
            self.buckets = {}
            return
        bucket, grams = pending[int(torch.nonzero(~finite)[0])]
        raise_non_finite_grams(self.engine, bucket.index, self.step, bucket.params, grams.cpu(), self.layout)

    def _non_finite(self, bucket: Bucket, tensor: Tensor, others: Optional[PieceRows | Tensor], gram: Tensor) -> Tensor:
        if self.loss_scaling:
            self._skipped = True
            return torch.full((gram.shape[0],), float("nan"), dtype=gram.dtype, device=gram.device)
        # ``tensor`` and ``others`` still hold this rank's own gradients: exchanges solve before they combine.
        rows = PieceRows.of(tensor, others).dense(tensor)
        bad_here = [not bool(torch.isfinite(rows[:, p.start : p.end]).all()) for p in bucket.params]
        raise_non_finite(self.engine, bucket.index, self.step, bucket.params, bad_here, self.layout, tensor.device, self.group)


def raise_non_finite_grams(
    engine: str, index: int, step: int, params: Sequence[ParamRange], piece_grams: Tensor, layout: LanguageLayout
) -> NoReturn:
    """Name the languages and parameters of a bucket whose all-reduced piece Grams ([P, T, T]) show a
    non-finite gradient (a NaN or Inf in language t's gradient of piece k makes ``G_k[t, t]``
    non-finite), then raise. Every rank holds the same Grams, so every rank raises the same."""
    # dict.fromkeys: an engine may split one parameter into several pieces (ZeRO-3's chunks).
    bad = dict.fromkeys(f"language {layout.names[t]}: {p.name}"
                        for k, p in enumerate(params) for t in range(piece_grams.shape[1])
                        if not bool(torch.isfinite(piece_grams[k, t, t])))
    raise FloatingPointError(
        f"non-finite gradient in {engine} bucket {index} at step {step} "
        f"(parameters {list(dict.fromkeys(p.name for p in params))}): {'; '.join(bad) or 'an off-diagonal Gram entry overflowed'}. "
        "Check those languages' losses and inputs, lower the learning rate, or use fp16 loss scaling."
    )


def raise_non_finite(
    engine: str,
    index: int,
    step: int,
    params: Sequence[ParamRange],
    bad_here: Sequence[bool],
    layout: LanguageLayout,
    device: torch.device,
    group=None,
) -> NoReturn:
    """Name the ranks and parameters with a non-finite gradient in a bucket, then raise.

    Every rank reaches this together (the bucket's Gram is all-reduced, so all see it non-finite),
    so the all-gather of the per-parameter flags cannot hang. ``bad_here[i]``: parameter i is
    non-finite on this rank.
    """
    flags = torch.tensor(list(bad_here), dtype=torch.uint8, device=device)  # NCCL gathers device tensors only
    every = [torch.empty_like(flags) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, flags, group=group)
    bad = dict.fromkeys(f"{layout.describe(r)}: {p.name}" for r, f in enumerate(every) for p, b in zip(params, f.tolist()) if b)
    raise FloatingPointError(
        f"non-finite gradient in {engine} bucket {index} at step {step} "
        f"(parameters {list(dict.fromkeys(p.name for p in params))}): {'; '.join(bad)}. "
        "Check those languages' losses and inputs, lower the learning rate, or use fp16 loss scaling."
    )
