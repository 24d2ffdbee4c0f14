"""CAGrad (Liu et al., NeurIPS 2021): conflict-averse gradient descent."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import brentq
from torch import Tensor

from .base import MOOSolver
from .qp import min_norm_weights, scale_of
from .upgrad import project_onto_dual_cone


class CAGrad(MOOSolver):
    """``d = g0 + (c‖g0‖/‖g_w‖) g_w`` with ``g0`` the mean gradient and
    ``w = argmin_{w ∈ simplex} ⟨g_w, g0⟩ + c‖g0‖‖g_w‖`` (the paper's dual problem).

    Solved exactly in Gram space: the minimiser ``x = g_w`` satisfies
    ``x = Proj_hull(−(s/r) g0)`` with ``s = ‖x‖`` and ``r = c‖g0‖`` (the stationarity condition
    of ``min_s min_x ⟨x, g0⟩ + r(‖x‖²/2s + s/2)``, whose inner problem is a projection onto the
    hull). ``‖Proj_hull(−(s/r) g0)‖/s`` is non-increasing in ``s`` (convexity in ``s``), so the
    fixed point is found by Brent's root finder, each evaluation an exact min-norm QP on the
    shifted Gram matrix.

    Args:
        c: conflict-aversion radius (paper default 0.5); ``c = 0`` is the mean.
        rescale: 0 keeps ``d``; 1 (paper default) divides by ``1 + c²``; 2 divides by ``1 + c``.

    When the minimiser is ``g_w = 0`` (e.g. ``c ≥ 1`` and zero in the hull) the optimal ``d`` of the
    dual problem ``max_{‖d − g0‖ ≤ c‖g0‖} min_t ⟨g_t, d⟩`` is not unique; we return the one closest
    to ``g0``: its projection onto the cone ``{d : ⟨g_t, d⟩ ≥ 0 ∀t}`` (equal to ``g0`` when nothing
    conflicts with it, as in the paper's code). ``‖g_w‖`` is resolved to a relative 1e-4 when it
    comes from cancelling long gradients (the Gram holds its square to 1e-16 of theirs); a
    minimiser shorter than 1e-6 of the longest gradient, or whose squared norm is within 1e4
    rounding errors of the Gram entries it is computed from, counts as zero.

    Declarations: conflict-free only for ``c ≥ 1`` (the ball ``‖d − g0‖ ≤ c‖g0‖`` then contains
    ``d = 0``, so the optimal ``min_t ⟨g_t, d⟩`` is ≥ 0; for ``c < 1``, the paper's 0.5 included, a
    task can conflict with ``d``, as with the mean at ``c = 0``); scale-invariant;
    permutation-equivariant; stateless.
    """

    name = "cagrad"
    conflict_free = False  # the default c = 0.5; CAGrad(c ≥ 1) sets it on the instance
    scale_invariant = True
    permutation_equivariant = True
    stateful = False

    def __init__(self, c: float = 0.5, rescale: int = 1) -> None:
        super().__init__()
        if c < 0:
            raise ValueError(f"CAGrad c must be ≥ 0, got {c}")
        if rescale not in (0, 1, 2):
            raise ValueError(f"CAGrad rescale must be 0, 1 or 2, got {rescale}")
        self.c = c
        self.rescale = rescale
        self.conflict_free = c >= 1

    def weights(self, gram: Tensor) -> Tensor:
        G = gram.numpy() / scale_of(gram.numpy())
        T = G.shape[0]
        mean = np.full(T, 1.0 / T)
        r = self.c * float(np.sqrt(max(mean @ G @ mean, 0.0)))  # c‖g0‖
        w = mean
        if r > 0:
            # c ≥ 1 and zero in the hull: F(x) ≥ (c − 1)‖g0‖‖x‖ ≥ 0 = F(0), so g_w = 0 exactly.
            w_min = min_norm_weights(G)
            stationary = self.c >= 1 and w_min @ G @ w_min <= 64 * T * _EPS
            s, proj = (0.0, None) if stationary else _cagrad_fixed_point(G, r)
            # g_w = 0: every d in the ball with no conflict is optimal; take the closest to g0.
            w = mean + (r / s) * proj if s > 0 else project_onto_dual_cone(G, mean)
        divisor = {0: 1.0, 1: 1.0 + self.c**2, 2: 1.0 + self.c}[self.rescale]
        return torch.from_numpy(w / divisor)


def _projection_weights(G: np.ndarray, s: float, r: float) -> np.ndarray:
    """Simplex weights of the projection of ``z = −(s/r) g0`` onto the hull: the min-norm point
    of the shifted gradients ``g_t − z``, whose Gram matrix follows from ``G``."""
    T = G.shape[0]
    beta = np.full(T, -(s / r) / T)  # z = Jᵀβ
    Gb = G @ beta
    shifted = G - Gb[:, None] - Gb[None, :] + beta @ Gb
    return min_norm_weights(shifted)


def _cagrad_fixed_point(G: np.ndarray, r: float) -> tuple[float, np.ndarray]:
    """Return ``(s, w)`` with ``‖Jᵀw‖ = s`` and ``Jᵀw = Proj_hull(−(s/r) g0)``; ``s = 0`` when the
    minimiser is ``g_w = 0`` or too short for the Gram matrix to resolve."""
    T = G.shape[0]
    hi = float(np.sqrt(np.max(np.diag(G))))  # every hull point has norm ≤ the largest gradient's

    def ratio_minus_one(s: float) -> tuple[float, bool]:
        w = _projection_weights(G, s, r)
        norm2 = float(w @ G @ w)
        # ‖x‖² within 1e4 × the rounding error of the quadratic form does not fix ‖x‖ to
        # better than 1e-4 (cancellation among long gradients): stop resolving there.
        resolved = norm2 > 1e4 * 64 * T * _EPS * float(np.abs(w) @ np.abs(G) @ np.abs(w))
        return np.sqrt(max(norm2, 0.0)) / s - 1.0, resolved

    if ratio_minus_one(hi)[0] >= 0:
        return hi, _projection_weights(G, hi, r)
    # ‖x(s)‖/s is non-increasing: walk down in decades until it exceeds one, then bracket. Below
    # 1e-6·hi the shifted Gram (O(1) entries, shift O(s)) no longer resolves the projection
    # (its norm is known to ~1e-8·hi), so the minimiser counts as zero there.
    upper = hi
    for _ in range(6):
        lower = upper / 10
        value, resolved = ratio_minus_one(lower)
        if not resolved:
            break
        if value > 0:
            s = brentq(lambda t: ratio_minus_one(t)[0], lower, upper, xtol=1e-15 * hi, rtol=4 * _EPS, maxiter=200)
            return s, _projection_weights(G, s, r)
        upper = lower
    return 0.0, np.zeros(T)


_EPS = float(np.finfo(np.float64).eps)
