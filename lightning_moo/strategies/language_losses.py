"""Every language's loss of a step, for solvers that read them and for loss-based weightings."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


class LanguageLosses:
    """Mixin for the bucket-level MOO strategies (``solver``, ``layout``, ``hook`` and Lightning's
    ``all_gather``). Each step it gathers every rank's losses (a few numbers) into the T languages'
    losses; a Gram solver with ``needs_losses`` reads them when the step's buckets are solved, and
    a loss weighting (``uses_gram = False``) turns them into the loss each rank backpropagates.
    """

    def _init_language_losses(self) -> None:
        self._stashed_losses: list[Tensor] = []  # this step's losses of the rank's first m - 1 languages
        self.language_losses: Optional[Tensor] = None  # every language's loss this step, when the solver needs them
        self.loss_weights: Optional[Tensor] = None  # a loss weighting's weights of this step

    def _with_language_losses(self, last: Tensor) -> Tensor:
        """Hand the solver every language's loss of this step; for a loss weighting, return the loss to
        backpropagate instead: this rank's languages' losses, each scaled by ``N·w_t/k`` so that the
        engine's average over the N ranks is ``Σ_t w_t ∇L_t`` (k ranks per language)."""
        own, self._stashed_losses = self._stashed_losses + [last], []
        gathered = self.all_gather(torch.stack([loss.detach().double() for loss in own])).reshape(-1)
        layout = self.layout
        losses = torch.stack([gathered[list(layout.rows_of(t))].mean() for t in range(layout.num_languages)])
        if not bool(torch.isfinite(losses).all()):
            # Every rank sees the same gathered losses, so every rank raises here, naming the languages.
            bad = [f"{layout.names[t]} ({float(losses[t])})" for t in range(layout.num_languages) if not bool(torch.isfinite(losses[t]))]
            raise FloatingPointError(
                f"the loss of {', '.join(bad)} is not finite at step {self.lightning_module.trainer.global_step}: check "
                "those languages' inputs, lower the learning rate, or use loss scaling / gradient clipping")
        self.language_losses = losses
        if self.solver.uses_gram:
            if self.hook is not None:
                self.hook.reducer.losses = losses  # read when this step's buckets are solved
            return last
        w = self.solver.weigh(losses, self.lightning_module.trainer.global_step).to(last.device)
        self.loss_weights = w
        scales = [self.world_size * w[t] / layout.ranks_per_language for t in layout.languages_of(self.global_rank)]
        return sum(loss * scale.to(loss.dtype) for loss, scale in zip(own, scales))
