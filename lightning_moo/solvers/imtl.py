"""IMTL-G (Liu et al., ICLR 2021): impartial gradient weighting."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import MOOSolver


class IMTLG(MOOSolver):
    """Weights summing to one such that ``d`` has the same projection on every unit gradient:
    ``⟨d, g_t/‖g_t‖⟩`` equal for all t. With ``d = Jᵀα`` that is ``Gα = λ n`` (``n`` the gradient
    norms), so ``α = G⁺n / 1ᵀG⁺n`` — the paper's closed form ``α₂:T = g₁Uᵀ(DUᵀ)⁻¹`` written on
    the Gram matrix, with the pseudo-inverse for rank-deficient Grams.

    Degenerate cases: zero gradients get weight 0 (they have no direction). When the gradients
    are linearly dependent so that no direction has equal non-zero projections (``n`` outside the
    range of ``G``, e.g. exactly opposed gradients) or ``1ᵀG⁺n = 0``, the weights are zero: no
    update.

    Declarations: scale-invariant; permutation-equivariant; stateless. Not conflict-free: the
    common projection ``λ = 1/1ᵀG⁺n`` is negative when ``1ᵀG⁺n < 0``, and then ``d`` conflicts with
    every task.
    """

    name = "imtlg"
    scale_invariant = True
    permutation_equivariant = True
    stateful = False

    def weights(self, gram: Tensor) -> Tensor:
        G = gram / gram.diagonal().max()
        norms = G.diagonal().clamp_min(0).sqrt()
        live = norms > 0
        w = torch.zeros_like(norms)
        sub, n = G[live][:, live], norms[live]
        alpha = torch.linalg.pinv(sub, hermitian=True, rtol=1e-10) @ n
        consistent = torch.linalg.vector_norm(sub @ alpha - n) <= 1e-8 * torch.linalg.vector_norm(n)
        total = alpha.sum()
        if consistent and total.abs() > 1e-8 * alpha.abs().sum():
            w[live] = alpha / total
        return w
