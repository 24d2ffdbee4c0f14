"""CAGrad (Liu et al., NeurIPS 2021): conflict-averse gradient descent."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import brentq
from torch import Tensor

from .base import MOOSolver
from .on_device import MAX_TASKS, cagrad_weights_on_device
from .qp import min_norm_weights, scale_of
from .upgrad import project_onto_dual_cone


class CAGrad(MOOSolver):
    """``d = g0 + (c‖g0‖/‖g_w‖) g_w`` with ``g0`` the mean gradient and
    ``w = argmin_{w ∈ simplex} ⟨g_w, g0⟩ + c‖g0‖‖g_w‖`` (the paper's dual problem).

    Solved exactly in Gram space: the minimiser ``x = g_w`` satisfies
    ``x = Proj_hull(−(s/r) g0)`` with ``s = ‖x‖`` and ``r = c‖g0‖`` (the stationarity condition
    of ``min_s min_x ⟨x, g0⟩ + r(‖x‖²/2s + s/2)``, whose inner problem is a projection onto the
    hull). ``‖Proj_hull(−(s/r) g0)‖/s`` is non-increasing in ``s`` (convexity in ``s``): the fixed
    point is bracketed, then found exactly on a face of the hull (where the projection is affine
    in ``s`` and the condition a quadratic), each evaluation an exact min-norm QP on the shifted
    Gram matrix warm-started from the previous support; Brent's method is the fallback.

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
            stationary = self.c >= 1 and _min_norm2(G) <= 64 * T * _EPS
            s, proj = (0.0, None) if stationary else _cagrad_fixed_point(G, r)
            # g_w = 0: every d in the ball with no conflict is optimal; take the closest to g0.
            w = mean + (r / s) * proj if s > 0 else project_onto_dual_cone(G, mean)
        return torch.from_numpy(w / self._divisor())

    def supports_on_device(self, num_tasks: int) -> bool:
        return num_tasks <= MAX_TASKS

    def weights_on_device(self, gram: Tensor) -> Tensor:
        """The same weights by enumeration over supports (exact, no host read; see :mod:`.on_device`)."""
        return cagrad_weights_on_device(gram, self.c) / self._divisor()

    def _divisor(self) -> float:
        return {0: 1.0, 1: 1.0 + self.c**2, 2: 1.0 + self.c}[self.rescale]


def _min_norm2(G: np.ndarray) -> float:
    w = min_norm_weights(G)
    return float(w @ G @ w)


class _Projections:
    """``s ↦`` the simplex weights of ``x(s) = Proj_hull(−(s/r) g0)``: the min-norm point of the
    shifted gradients ``g_t − z``, ``z = −(s/r) g0``, whose Gram matrix follows from ``G``. Each
    solve starts from the support of the previous one (nearby ``s`` share most of it)."""

    def __init__(self, G: np.ndarray, r: float) -> None:
        self.G, self.r = G, r
        self.b = G.mean(axis=1)  # G @ mean: ⟨g_t, g0⟩
        self.b_sum = self.b[:, None] + self.b[None, :]
        self.g0_norm2 = float(self.b.mean())  # ‖g0‖²
        self.support: np.ndarray | None = None

    def __call__(self, s: float) -> np.ndarray:
        t = s / self.r  # ⟨g_i − z, g_j − z⟩ = G_ij + t(b_i + b_j) + t²‖g0‖²
        w = min_norm_weights(self.G + t * self.b_sum + t * t * self.g0_norm2, start=self.support)
        self.support = w > 0
        return w

    def fixed_point_on_face(self, w: np.ndarray, lower: float, upper: float) -> float | None:
        """The ``s`` in ``(lower, upper)`` with ``‖x(s)‖ = s`` if the projection stays on the face
        of ``w``'s support: there ``x(s)`` is affine in ``s`` (the projection onto the face's affine
        hull, ``w(s) = w0 + s·w1`` from its KKT system), so the condition is a quadratic in ``s``.
        None when the face is degenerate or the root leaves the interval."""
        S = w > 0
        k = int(S.sum())
        K = np.ones((k + 1, k + 1))
        K[:k, :k] = self.G[S][:, S]
        K[k, k] = 0.0
        rhs = np.zeros((k + 1, 2))
        rhs[k, 0] = 1.0
        rhs[:k, 1] = -self.b[S] / self.r
        try:
            sol = np.linalg.solve(K, rhs)[:k]
        except np.linalg.LinAlgError:
            return None
        (A, B), (_, C) = sol.T @ self.G[np.ix_(S, S)] @ sol  # ‖x(s)‖² = A + 2Bs + Cs²
        a2, a1, a0 = C - 1.0, 2.0 * B, A
        disc = a1 * a1 - 4.0 * a2 * a0
        if not np.isfinite(disc) or disc < 0:
            return None
        # Both roots without cancellation: q = −(a1 + sign(a1)√disc)/2, roots q/a2 and a0/q.
        half = -0.5 * (a1 + np.copysign(np.sqrt(disc), a1))
        roots = [x for x in (half / a2 if a2 else np.inf, a0 / half if half else np.inf) if lower < x < upper]
        return min(roots, key=lambda x: abs(x - 0.5 * (lower + upper)), default=None)


def _cagrad_fixed_point(G: np.ndarray, r: float) -> tuple[float, np.ndarray]:
    """Return ``(s, w)`` with ``‖Jᵀw‖ = s`` and ``Jᵀw = Proj_hull(−(s/r) g0)``; ``s = 0`` when the
    minimiser is ``g_w = 0`` or too short for the Gram matrix to resolve."""
    T = G.shape[0]
    hi = float(np.sqrt(np.max(np.diag(G))))  # every hull point has norm ≤ the largest gradient's
    project = _Projections(G, r)

    def ratio_minus_one(s: float) -> tuple[float, bool, np.ndarray]:
        w = project(s)
        norm2 = float(w @ G @ w)
        # ‖x‖² within 1e4 × the rounding error of the quadratic form does not fix ‖x‖ to
        # better than 1e-4 (cancellation among long gradients): stop resolving there.
        resolved = norm2 > 1e4 * 64 * T * _EPS * float(np.abs(w) @ np.abs(G) @ np.abs(w))
        return np.sqrt(max(norm2, 0.0)) / s - 1.0, resolved, w

    value, _, w_upper = ratio_minus_one(hi)
    if value >= 0:
        return hi, w_upper
    # ‖x(s)‖/s is non-increasing: walk down in decades until it exceeds one, then bracket. Below
    # 1e-6·hi the shifted Gram (O(1) entries, shift O(s)) no longer resolves the projection
    # (its norm is known to ~1e-8·hi), so the minimiser counts as zero there.
    upper = hi
    for _ in range(6):
        lower = upper / 10
        value, resolved, w_lower = ratio_minus_one(lower)
        if not resolved:
            break
        if value > 0:
            return _root_in_bracket(ratio_minus_one, project, lower, upper, w_upper, hi)
        upper, w_upper = lower, w_lower
    return 0.0, np.zeros(T)


def _root_in_bracket(ratio_minus_one, project: _Projections, lower: float, upper: float, w: np.ndarray,
                     hi: float) -> tuple[float, np.ndarray]:
    """The root of ``‖x(s)‖/s − 1``, positive at ``lower`` and negative at ``upper`` (where the
    projection has weights ``w``).

    ``x(s)`` is piecewise affine in ``s`` (one piece per face of the hull), so the root on the
    face of the last projection is exact, and it is the root once the projection there stays on
    that face: usually one or two projections. Where a face is degenerate, its root leaves the
    bracket or does not check out, the bracket is bisected; Brent's method finishes if this has
    not ended after a few dozen steps.
    """
    xtol = 1e-15 * hi
    use_face = True
    for _ in range(40):
        if upper - lower <= xtol + 4 * _EPS * upper:
            break
        s = project.fixed_point_on_face(w, lower, upper) if use_face else None
        s = 0.5 * (lower + upper) if s is None else s
        face = w > 0
        value, _, w = ratio_minus_one(s)
        same_face = bool(((w > 0) == face).all())
        if value == 0 or same_face and abs(value) <= 1e-8:
            return s, w
        use_face = not same_face
        if value > 0:
            lower = s
        else:
            upper = s
    s = brentq(lambda t: ratio_minus_one(t)[0], lower, upper, xtol=xtol, rtol=4 * _EPS, maxiter=200)
    return s, ratio_minus_one(s)[2]


_EPS = float(np.finfo(np.float64).eps)
