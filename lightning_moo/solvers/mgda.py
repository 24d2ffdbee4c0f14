"""MGDA (Désidéri 2012; Sener & Koltun 2018): the min-norm point of the gradients' convex hull."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .base import MOOSolver
from .qp import min_norm_weights


class MGDA(MOOSolver):
    """Exact min-norm element ``d = Σ w_t g_t`` of the convex hull (``w`` on the simplex).

    ``d`` is a common descent direction (``⟨g_t, d⟩ ≥ ‖d‖² ≥ 0`` for every task) and is zero exactly
    when the tasks are Pareto-stationary. Solved exactly (closed form for T = 2, Lawson–Hanson
    active set otherwise), not by Frank–Wolfe.

    Args:
        normalization: ``"none"`` (default, as in Sener & Koltun's MGDA-UB) or ``"l2"``: solve on the
            unit gradients ``g_t/‖g_t‖`` and return weights for the original gradients
            (``w_t / ‖g_t‖``); a zero gradient then stays zero and makes ``d = 0``.

    Degenerate cases: a zero gradient lies in the hull, so ``d = 0`` (all weight on it); identical
    gradients give any point of the simplex (the direction is the same); the weights are one
    optimal solution when several exist, while ``d`` is always unique.

    Declarations: conflict-free (``⟨g_t, d⟩ ≥ ‖d‖²``, with either normalization); scale-invariant
    for ``"none"`` only (``"l2"`` weights scale as ``1/‖g_t‖``: ``d`` is then unchanged by
    scaling, not scaled); permutation-equivariant; stateless.
    """

    name = "mgda"
    conflict_free = True
    scale_invariant = True
    permutation_equivariant = True
    stateful = False

    def __init__(self, normalization: Literal["none", "l2"] = "none") -> None:
        super().__init__()
        if normalization not in ("none", "l2"):
            raise ValueError(f"MGDA normalization must be 'none' or 'l2', got {normalization!r}")
        self.normalization = normalization
        if normalization == "l2":
            self.scale_invariant = False

    def weights(self, gram: Tensor) -> Tensor:
        if self.normalization == "none":
            return torch.from_numpy(min_norm_weights(gram.numpy()))
        norms = gram.diagonal().clamp_min(0).sqrt()
        inv = torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))
        unit_gram = gram * inv[:, None] * inv[None, :]
        return torch.from_numpy(min_norm_weights(unit_gram.numpy())) * inv
