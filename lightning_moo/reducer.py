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
"""

from __future__ import annotations

from typing import NoReturn, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .buckets import Bucket, BucketInfo, ParamRange
from .exchange import Exchange
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
    """

    def __init__(
        self,
        solver: MOOSolver,
        exchange: Exchange,
        layout: LanguageLayout,
        engine: str,
        loss_scaling: bool = False,
        group=None,
    ) -> None:
        self.solver, self.exchange, self.layout = solver, exchange, layout
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

    def reduce(self, tensor: Tensor, bucket: Bucket, others: Optional[Tensor] = None) -> Tensor:
        """Write the combination into this rank's elements of ``tensor`` (this rank's flat gradient of
        ``bucket``; ``others`` [m - 1, n]: its other languages' rows); return the weights."""

        def solve(gram: Tensor) -> Tensor:
            if not bool(torch.isfinite(gram).all()):
                return self._non_finite(bucket, tensor, others, gram)
            return self.solver(gram, bucket=bucket.index, step=self.step, losses=self.losses)

        pieces = [(p.start, p.end) for p in bucket.params]
        piece_grams, w = self.exchange.reduce(tensor, bucket.owners, pieces, solve, self.layout, self.group, others)
        if self._skipped:
            self.buckets = {}
        else:
            piece_grams = piece_grams.cpu()
            self.buckets[bucket.index] = BucketInfo(
                bucket.index, bucket.params, tensor.numel(), piece_grams.sum(0), w.detach().to("cpu", torch.float64),
                self.step, piece_grams,
            )
        return w

    def _non_finite(self, bucket: Bucket, tensor: Tensor, others: Optional[Tensor], gram: Tensor) -> Tensor:
        if self.loss_scaling:
            self._skipped = True
            return torch.full((gram.shape[0],), float("nan"), dtype=gram.dtype, device=gram.device)
        # ``tensor`` and ``others`` still hold this rank's own gradients: exchanges solve before they combine.
        rows = tensor.view(1, -1) if others is None else torch.cat([others.to(tensor.dtype), tensor.view(1, -1)])
        bad_here = [not bool(torch.isfinite(rows[:, p.start : p.end]).all()) for p in bucket.params]
        raise_non_finite(self.engine, bucket.index, self.step, bucket.params, bad_here, self.layout, tensor.device, self.group)


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
    bad = [f"{layout.describe(r)}: {p.name}" for r, f in enumerate(every) for p, b in zip(params, f.tolist()) if b]
    raise FloatingPointError(
        f"non-finite gradient in {engine} bucket {index} at step {step} "
        f"(parameters {[p.name for p in params]}): {'; '.join(bad)}. "
        "Check those languages' losses and inputs, lower the learning rate, or use fp16 loss scaling."
    )
