"""IMTL-G (Liu et al., ICLR 2021): impartial gradient weighting."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .base import MOOSolver
from .qp import eigh


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
        # NumPy rather than torch: at T ≤ a few dozen every torch op costs more than its arithmetic,
        # and so does every NumPy call (~1-5 µs each): the usual case (no zero gradient, full rank)
        # skips the sub-matrix and the eigenvalue cut.
        G = gram.numpy()
        G = G / G.diagonal().max()
        norms = np.sqrt(np.maximum(G.diagonal(), 0.0))
        live = norms > 0
        every = live.all()
        sub, n = (G, norms) if every else (G[np.ix_(live, live)], norms[live])
        # Pseudo-inverse from the eigendecomposition, eigenvalues within 1e-10 of the largest cut.
        lam, V = eigh(sub)
        keep = np.abs(lam) > 1e-10 * max(-lam[0], lam[-1])  # ascending: the largest |λ| is at an end
        if not keep.all():
            lam, V = lam[keep], V[:, keep]
        alpha = V @ ((n @ V) / lam)
        residual = sub @ alpha - n
        consistent = residual @ residual <= 1e-16 * (n @ n)  # ‖Gα − n‖ ≤ 1e-8 ‖n‖
        total = alpha.sum()
        if not (consistent and abs(total) > 1e-8 * np.abs(alpha).sum()):
            return torch.zeros(len(norms), dtype=torch.float64)
        if every:
            return torch.from_numpy(alpha / total)
        w = np.zeros_like(norms)
        w[live] = alpha / total
        return torch.from_numpy(w)
