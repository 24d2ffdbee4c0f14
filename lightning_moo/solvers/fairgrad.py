"""FairGrad (Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .base import MOOSolver
from .qp import min_norm_weights, scale_of


class FairGrad(MOOSolver):
    """α-fair weights: the positive solution ``w`` of ``G w = w^(−1/α)`` (elementwise).

    The paper treats ``u_t = ⟨g_t, d⟩`` as the utility task t gets from the update and picks the
    α-fair allocation, ``max_d Σ_t u_t^(1−α)/(1−α)`` (``Σ log u_t`` for α = 1) over a ball;
    stationarity gives ``d = Σ w_t g_t`` with ``(Gw)_t = w_t^(−1/α)``, the scale of ``w`` fixed by
    that equation (the authors' code solves it with ``scipy.optimize.least_squares`` on the raw
    Gram, from ``w = 1/T``, to SciPy's default tolerances; its training scripts then multiply
    ``d`` by T and clip its norm, conventions of the shared MTL code base, left out here as for
    the other solvers). α = 1 is proportional fairness, i.e.
    Nash-MTL's equation ``Gw = 1/w`` (without Nash-MTL's Frobenius normalisation); α → ∞ tends to
    max-min fairness.

    **Numerics.** Here ``w`` is the exact minimiser of the strictly convex potential
    ``½ wᵀGw − Σ_t φ(w_t)`` with ``φ'(w) = w^(−1/α)`` (``φ = log`` for α = 1, else
    ``w^(1−1/α)/(1−1/α)``), whose stationarity condition is the equation above: damped Newton
    (Hessian ``G + diag(h)``, ``h_t = w_t^(−1−1/α)/α``, solved as ``D(DGD + I)D`` with
    ``D = diag(h^(−1/2))``, so rank-deficient Grams are never singular), a fraction-to-the-boundary
    rule keeping ``w > 0``, Armijo backtracking on the potential's change computed term by term
    (``log1p``/``expm1`` of ``δ/w``: weights can lie eleven orders apart). It is solved on ``G/s``
    (``s`` the largest squared norm) and rescaled by ``s^(−α/(1+α))``, the equation's exact scaling
    law. It stops once every relative residual ``r_t = |(Gw)_t w_t^(1/α) − 1|`` is below 1e-12 or
    below its rounding floor
    ``8·T·eps·(|G||w|)_t·w_t^(1/α)`` (the error of computing ``(Gw)_t``, relative to it; above
    1e-12 only where ``Gw`` cancels, next to Pareto stationarity or for small α); if the residual
    stops halving for 10 steps it accepts ``r_t ≤ max(1e-6, 10·floor_t)``, and raises
    ``RuntimeError`` if that does not hold after 500 steps (never seen in testing). Random
    well-conditioned Grams end below 1e-12 (Newton converges quadratically near the solution).

    **Degenerate Grams.** A positive solution exists iff zero is not in the convex hull of the
    non-zero gradients (then the potential is coercive on the orthant; otherwise it is unbounded
    below or its infimum is not attained along a ray ``s·w``, ``Jᵀw = 0``). Zero gradients are
    left out (weight 0): their utility is zero whatever ``d`` is, and their equation row
    ``0 = w_t^(−1/α)`` has no solution — the authors' least-squares solver sends such a weight to
    its bound and solves the others' system, the same direction. When zero is in the hull of the
    rest (opposed gradients, Pareto stationarity: no update improves every task), there is no
    α-fair allocation and the weights are zero, i.e. no update (as :class:`NashMTL`); "in the hull"
    means a min-norm point with ``‖d_min‖² ≤ 1e-10`` of the largest squared norm.

    Declarations: conflict-free (``⟨g_t, d⟩ = (Gw)_t = w_t^(−1/α) > 0``; 0 for a zero gradient or
    at stationarity); permutation-equivariant (the solution is unique); stateless (no warm
    start). Not scale-invariant: ``G → cG`` scales ``w`` by ``c^(−α/(1+α))``, so scaling every
    gradient by ``a`` scales ``d`` by ``a^((1−α)/(1+α))`` (the direction's shape, ``d/‖d‖``, is
    invariant; for α = 1 ``d`` itself is).

    Args:
        alpha: the fairness exponent α > 0. Default 2.0: the value of every run script the authors
            released (``experiments/celeba/run.sh``, ``experiments/quantum_chemistry/run.sh``,
            ``mtrl_files/run.sh`` for MT10/MT50 in github.com/OptMN-Lab/fairgrad); their argparse
            default is 1.0 (Nash-MTL's equation).
    """

    name = "fairgrad"
    conflict_free = True
    scale_invariant = False
    permutation_equivariant = True
    stateful = False

    def __init__(self, alpha: float = 2.0) -> None:
        super().__init__()
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"FairGrad alpha must be a finite number > 0, got {alpha!r}")
        self.alpha = float(alpha)

    def weights(self, gram: Tensor) -> Tensor:
        return torch.from_numpy(fairgrad_weights(gram.numpy(), self.alpha))


def fairgrad_weights(gram: np.ndarray, alpha: float, max_iter: int = 500) -> np.ndarray:
    """The positive solution of ``gram @ w = w**(-1/alpha)`` over the non-zero gradients (zero
    weights for zero gradients), or zeros when none exists. See :class:`FairGrad`."""
    T = gram.shape[0]
    w = np.zeros(T)
    live = np.diag(gram) > 0
    if not live.any():
        return w
    G = gram[np.ix_(live, live)]
    s = scale_of(G)
    G = G / s
    w_min = min_norm_weights(G)
    if w_min @ G @ w_min <= 1e-10:  # zero is (to the Gram's digits) in the hull: stationary
        return w
    w[live] = _solve_normalised(G, alpha, max_iter) * s ** (-alpha / (1.0 + alpha))
    return w


def _solve_normalised(G: np.ndarray, alpha: float, max_iter: int) -> np.ndarray:
    """Newton on the potential for a Gram with largest diagonal 1 and zero outside the hull."""
    p = 1.0 / alpha
    T = G.shape[0]
    # The single-task solutions, G_tt w_t = w_t^(−p): the right scale per task to start from.
    w = np.diag(G) ** (-alpha / (1.0 + alpha))

    best, stalled = np.inf, 0
    for _ in range(max_iter):
        r, floor = _residual(G, w, p)
        if (r <= np.maximum(1e-12, floor)).all():
            return w
        residual = float(r.max())
        best, stalled = (residual, 0) if residual < 0.5 * best else (best, stalled + 1)
        if stalled >= 10 and _verified(r, floor):  # no more progress, at the Gram's precision
            return w
        grad = G @ w - w ** (-p)
        D = np.sqrt(alpha * w ** (1.0 + p))  # h^(−1/2), h = w^(−1−p)/α
        step = -D * np.linalg.solve(D[:, None] * G * D[None, :] + np.eye(T), D * grad)
        t = 1.0
        neg = step < 0
        if neg.any():  # stay inside w > 0
            t = min(1.0, 0.99 * float(np.min(-w[neg] / step[neg])))
        slope = float(grad @ step)
        Gw, sGs = G @ w, float(step @ G @ step)

        def accepted(t: float) -> bool:
            # Armijo on the potential's change, computed term by term (no difference of two
            # large totals, which rounding hides where some w_t are large and others tiny), or
            # a smaller residual of the equation.
            change = t * float(step @ Gw) + 0.5 * t * t * sGs - _barrier_change(w, t * step, p).sum()
            return change <= 1e-4 * t * slope or _residual(G, w + t * step, p)[0].max() < residual

        while not accepted(t) and t > 1e-16:
            t *= 0.5
        w = w + t * step
    r, floor = _residual(G, w, p)
    if _verified(r, floor):
        return w
    raise RuntimeError(
        f"FairGrad Newton iteration stopped at relative residual {r.max():.2e} after {max_iter} steps "
        f"(alpha={alpha}, Gram {G.tolist()})"
    )


def _barrier_change(w: np.ndarray, delta: np.ndarray, p: float) -> np.ndarray:
    """``φ(w + δ) − φ(w)`` per task without cancellation: ``φ = log`` (p = 1) or
    ``w^(1−p)/(1−p)``, through ``log1p`` and ``expm1`` of the relative change ``δ/w``."""
    log_ratio = np.log1p(delta / w)
    if p == 1.0:
        return log_ratio
    return w ** (1.0 - p) * np.expm1((1.0 - p) * log_ratio) / (1.0 - p)


def _residual(G: np.ndarray, w: np.ndarray, p: float) -> tuple[np.ndarray, np.ndarray]:
    """Relative residuals ``|(Gw)_t w_t^p − 1|`` and their rounding floors: ``(Gw)_t`` carries an
    absolute error of about ``T·eps·(|G||w|)_t``, which the residual sees times ``w_t^p``."""
    wp = w**p
    r = np.abs((G @ w) * wp - 1.0)
    floor = 8 * G.shape[0] * np.finfo(np.float64).eps * (np.abs(G) @ w) * wp
    return r, floor


def _verified(r: np.ndarray, floor: np.ndarray) -> bool:
    """The equation holds to 1e-6, or to within ten times what the Gram's rounding can resolve."""
    return bool((r <= np.maximum(1e-6, 10 * floor)).all())
