"""MGDA (Désidéri 2012; Sener & Koltun 2018): the min-norm point of the gradients' convex hull."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .base import MOOSolver
from .on_device import MAX_TASKS, min_norm_weights_on_device
from .qp import min_norm_weights

NORMALIZATIONS = ("none", "l2", "loss", "loss+")


class MGDA(MOOSolver):
    """Exact min-norm element ``d = Σ w_t g_t`` of the convex hull (``w`` on the simplex).

    ``d`` is a common descent direction (``⟨g_t, d⟩ ≥ ‖d‖² ≥ 0`` for every task) and is zero exactly
    when the tasks are Pareto-stationary. Solved exactly (closed form for T = 2, Lawson–Hanson
    active set otherwise), not by Frank–Wolfe.

    Args:
        normalization: what each gradient is divided by before the min-norm problem, as in Sener &
            Koltun's ``gradient_normalizers``: ``"none"`` (1; the default, their MGDA-UB), ``"l2"``
            (``‖g_t‖``, here the bucket's), ``"loss"`` (the language's loss ``L_t``) or ``"loss+"``
            (``L_t ‖g_t‖``, the setting of their experiments). The last two need each step's losses,
            which the strategies then gather (a few numbers per step).
        apply_to: ``"normalized"`` (default): ``d`` is the min-norm point of the normalized
            gradients, so the returned weights are ``w_t / n_t`` — conflict-free whatever the
            normalization. ``"raw"``: the weights found for the normalized gradients applied to the raw
            ones, ``d = Σ w_t g_t``, as their code does (it scales the raw losses by ``w_t``); then
            ``d`` may conflict with a language unless ``normalization="none"``.

    Degenerate cases: a zero gradient lies in the hull, so ``d = 0`` (all weight on it); identical
    gradients give any point of the simplex (the direction is the same); the weights are one
    optimal solution when several exist, while ``d`` is always unique.

    Declarations: conflict-free with ``apply_to="normalized"`` (``⟨g_t, d⟩ ≥ n_t ‖d‖² ≥ 0``) or
    ``normalization="none"``; scale-invariant for ``"none"`` and ``"loss"`` (gradients scaled, losses
    kept: ``"l2"`` and ``"loss+"`` divide the scale out, so ``d`` is unchanged rather than scaled);
    permutation-equivariant; stateless.
    """

    name = "mgda"
    conflict_free = True
    scale_invariant = True
    permutation_equivariant = True
    stateful = False

    def __init__(self, normalization: Literal["none", "l2", "loss", "loss+"] = "none",
                 apply_to: Literal["normalized", "raw"] = "normalized") -> None:
        super().__init__()
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"MGDA normalization must be one of {', '.join(NORMALIZATIONS)}, got {normalization!r}")
        if apply_to not in ("normalized", "raw"):
            raise ValueError(f"MGDA apply_to must be 'normalized' or 'raw', got {apply_to!r}")
        self.normalization, self.apply_to = normalization, apply_to
        self.needs_losses = normalization in ("loss", "loss+")
        self.scale_invariant = normalization in ("none", "loss")
        self.conflict_free = apply_to == "normalized" or normalization == "none"

    def weights(self, gram: Tensor) -> Tensor:
        if self.normalization == "none":
            return torch.from_numpy(min_norm_weights(gram.numpy()))
        n = self._normalizers(gram)
        inv = torch.where(n > 0, 1.0 / n, torch.zeros_like(n))  # a zero gradient stays zero
        w = torch.from_numpy(min_norm_weights((gram * inv[:, None] * inv[None, :]).numpy()))
        return w * inv if self.apply_to == "normalized" else w

    def supports_on_device(self, num_tasks: int) -> bool:
        # The loss normalizations read each step's losses, which the strategies hold on the host.
        return num_tasks <= MAX_TASKS and self.normalization in ("none", "l2")

    def weights_on_device(self, gram: Tensor) -> Tensor:
        """The same weights by enumeration over supports (exact, no host read; see :mod:`.on_device`)."""
        if self.normalization == "none":
            return min_norm_weights_on_device(gram)
        norms = gram.diagonal().to(torch.float64).clamp_min(0).sqrt()
        inv = torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))
        w = min_norm_weights_on_device(gram * inv[:, None] * inv[None, :])
        return w * inv if self.apply_to == "normalized" else w

    def _normalizers(self, gram: Tensor) -> Tensor:
        """``n_t`` of Sener & Koltun's ``gradient_normalizers``, from the Gram's diagonal and the losses."""
        norms = gram.diagonal().clamp_min(0).sqrt()
        if self.normalization == "l2":
            return norms
        if self.losses is None:
            raise ValueError(f"MGDA(normalization={self.normalization!r}) needs each language's loss: call it as "
                             "solver(gram, losses=...) (the strategies do when solver.needs_losses)")
        if not bool((self.losses > 0).all()):
            raise ValueError(f"MGDA(normalization={self.normalization!r}) divides by the losses, which must be "
                             f"positive: got {self.losses.tolist()}; use normalization='l2' for such losses")
        losses = self.losses.to(gram.dtype)
        return losses if self.normalization == "loss" else losses * norms
