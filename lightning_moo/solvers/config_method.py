"""ConFIG (Liu, Chu & Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed
Neural Networks", ICLR 2025): the direction with the same cosine to every gradient."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .base import MOOSolver
from .qp import eigh, nnls_gram, scale_of

_EPS_F32 = float(np.finfo(np.float32).eps)


class ConFIG(MOOSolver):
    """Conflict-Free Inverse Gradients: ``d = (Σ_t ⟨g_t, v̂⟩) v̂`` with ``v̂ = v/‖v‖`` and
    ``v = U⁺ 1``, ``U`` the matrix of unit gradients ``u_t = g_t/‖g_t‖`` (rows): ``v`` is the
    least-norm vector with ``⟨u_t, v⟩ = 1`` for every t, so ``d`` has the same cosine with every
    gradient, and its length is the sum of the gradients' projections on it (the paper's
    ``ProjectionLength``, the default length model of the authors' ``conflictfree`` package, with
    the default equal direction weights ``ŵ = 1``).

    **On the Gram matrix.** With ``n_t = ‖g_t‖`` and ``C = UUᵀ = D⁻¹GD⁻¹`` (``D = diag(n)``),
    ``v = Uᵀβ`` with ``β = C⁺1`` (replaced by ``γ = β + y`` below when ``v`` conflicts); then
    ``⟨u_t, v⟩ = (Cβ)_t``, ``‖v‖² = βᵀCβ`` and ``d = k Σ_t (β_t/n_t) g_t`` with
    ``k = Σ_t n_t (Cβ)_t / ‖v‖²``: the weights are ``w_t = k β_t / n_t``. ``C`` has a unit
    diagonal, so it carries no scale; its pseudo-inverse comes from its eigendecomposition,
    eigenvalues at or below ``rtol · λ_max`` counting as zero (default ``rtol = T·eps_float32``,
    the cutoff :class:`AlignedMTL` uses: unit gradients whose singular values are below
    ``√(T·eps_f32)`` ≈ 3.5e-4·√T of the largest are treated as dependent, which a Gram
    accumulated in float32 cannot resolve anyway; the authors' ``torch.linalg.lstsq`` cuts
    singular values at ``eps·max(T, n)`` on CPU and not at all on CUDA).

    **Rank deficiency.** When ``1`` is in the range of ``C`` (e.g. linearly independent
    gradients, the usual case for T languages in a large bucket) the cosines are all equal and
    positive and the result is the paper's. Otherwise no direction has equal cosines, and the
    paper's least-squares ``v`` has the cosine profile ``P1`` (``P`` the projector on the range
    of ``C``), which can be negative: a conflict (e.g. three gradients in a plane, one of them
    nearly opposed to the others). The paper's ``v`` is then replaced by its projection onto the
    dual cone ``{x : ⟨g_t, x⟩ ≥ 0 ∀t}`` — the nearest direction that conflicts with no task, as
    :class:`DualProj` does for the mean — found exactly by the NNLS
    ``y = argmin_{y≥0} ‖Uᵀ(β + y)‖²`` (Lawson–Hanson on ``C``), ``v = Uᵀ(β + y)``; ``y = 0``, the
    paper's ``v`` unchanged, whenever that conflicts with no task. The length rule is applied to
    the projected direction. The projection is zero — no update — when a strictly positive
    combination of the gradients vanishes (the dual cone is then the null space of ``U``,
    orthogonal to ``v``), e.g. exactly opposed gradients; in 20 000 random draws with more
    gradients than dimensions it was zero only when no direction improved every task. Zero
    weights also come when ``v`` is zero to the Gram's precision: ``‖P1‖ ≤ 1e-10·√T`` (the unit
    gradients sum to zero), ``‖v‖² ≤ 1e3·T·eps·‖γ‖₁²`` or a cosine below ``−1e-10`` after the
    projection. Zero gradients have no direction and get weight 0 (the authors' code turns their
    unit vector into 0, which drops them from the least-squares fit as well).

    The two-task closed form of the paper (sum of the unit orthogonal components) is the same
    direction; the momentum variant M-ConFIG is not implemented (it keeps per-task gradient
    momenta and back-propagates one task per step: parameter-sized state a Gram solver never sees).

    Declarations: conflict-free (``⟨g_t, d⟩ = n_t · ‖d‖ · cos(g_t, d)`` with every cosine ≥ 0 after
    the projection, and ``‖d‖ = Σ_t n_t cos(g_t, d) ≥ 0``); scale-invariant (only ``C`` and ratios of
    norms enter); permutation-equivariant; stateless.

    Args:
        rtol: relative eigenvalue cutoff for the pseudo-inverse of ``C`` (default
            ``T·eps_float32``, T the number of non-zero gradients).
    """

    name = "config"
    conflict_free = True
    scale_invariant = True
    permutation_equivariant = True
    stateful = False

    def __init__(self, rtol: float | None = None) -> None:
        super().__init__()
        if rtol is not None and not (0 <= rtol < 1):
            raise ValueError(f"ConFIG rtol must be in [0, 1), got {rtol!r}")
        self.rtol = rtol

    def weights(self, gram: Tensor) -> Tensor:
        return torch.from_numpy(config_weights(gram.numpy(), self.rtol))


def config_weights(gram: np.ndarray, rtol: float | None = None) -> np.ndarray:
    """ConFIG's weights on the gradients of ``gram`` (see :class:`ConFIG`)."""
    T = gram.shape[0]
    w = np.zeros(T)
    G = gram / scale_of(gram)  # the caller (MOOSolver.__call__) has ruled out an all-zero Gram
    norms = np.sqrt(np.maximum(np.diag(G), 0.0))
    live = norms > 0
    n = norms[live]
    C = G[np.ix_(live, live)] / n[:, None] / n[None, :]
    C = 0.5 * (C + C.T)
    np.fill_diagonal(C, 1.0)
    lam, V = eigh(C)
    keep = lam > (rtol if rtol is not None else n.size * _EPS_F32) * lam.max()
    lam, V = lam[keep], V[:, keep]
    beta = V @ ((V.T @ np.ones(n.size)) / lam)  # β = C⁺1: the paper's least-squares v = Uᵀβ
    if np.linalg.norm(C @ beta) <= 1e-10 * np.sqrt(n.size):
        return w  # the profile P1 is 0: the unit gradients sum to zero, v = 0
    # Project v onto the dual cone {x : Ux ≥ 0} (as DualProj does): v + Uᵀy with
    # y = argmin_{y ≥ 0} ‖Uᵀ(β + y)‖²; y = 0 (the paper's v) when Cβ ≥ 0.
    gamma = beta + nnls_gram(C, C @ beta)
    cos = C @ gamma  # ⟨u_t, v⟩
    norm2 = float(gamma @ cos)  # ‖v‖²
    # v = 0 to the precision of C (γᵀCγ carries an error of about T·eps·‖γ‖₁²), or cosines too
    # small to resolve: the projection is zero, no direction to take.
    resolution = 1e3 * n.size * np.finfo(np.float64).eps * np.abs(gamma).sum() ** 2
    if norm2 <= resolution or cos.min() < -1e-10 * np.sqrt(norm2):
        return w
    w[live] = float(n @ cos) / norm2 * gamma / n
    return w
