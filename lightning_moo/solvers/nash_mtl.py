"""Nash-MTL (Navon et al., ICML 2022): the Nash bargaining solution among tasks."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .base import MOOSolver
from .qp import min_norm_weights, scale_of


class NashMTL(MOOSolver):
    """Weights ``α > 0`` solving ``Gα = 1/α`` on the Frobenius-normalised Gram matrix (as the
    paper's code normalises it), i.e. every task's utility ``⟨g_t, d⟩·α_t`` is equal.

    The paper approximates the solution by a sequence of convex programs (cvxpy, 20 iterations);
    here it is the exact minimiser of the strictly convex ``½αᵀGα − Σ log α_t`` (its stationarity
    condition is ``Gα = 1/α``), found by damped Newton to a relative residual of 1e-10 (on ill-conditioned Grams, to where it stalls,
    at most 1e-5).

    The bargaining problem has no solution when zero is in the gradients' convex hull (a zero
    gradient, or gradients that cancel: Pareto stationarity, nothing improves every task); the
    weights are then zero, i.e. no update.

    Declarations: conflict-free (``(Gα)_t = 1/α_t > 0``: every task improves; zero weights at
    stationarity); scale-invariant (the Gram is normalised); permutation-equivariant; stateful
    (the last weights per bucket, reused by ``update_weights_every``). With
    ``update_weights_every > 1`` a step may reuse the weights of an earlier Gram, so the instance
    declares none of the three guarantees.

    Args:
        update_weights_every: recompute the weights every k steps per bucket, reusing them in
            between (paper's speed-up; default 1 = every step).
    """

    name = "nashmtl"
    conflict_free = True
    scale_invariant = True
    permutation_equivariant = True
    stateful = True

    def __init__(self, update_weights_every: int = 1) -> None:
        super().__init__()
        if update_weights_every < 1:
            raise ValueError("NashMTL update_weights_every must be ≥ 1")
        self.update_weights_every = update_weights_every
        if update_weights_every > 1:
            self.conflict_free = self.scale_invariant = self.permutation_equivariant = False

    def weights(self, gram: Tensor) -> Tensor:
        state = self.bucket_state()
        reuse = (
            self.update_weights_every > 1
            and len(state.get("weights", ())) == gram.shape[0]
            and self.step - state["step"] < self.update_weights_every
        )
        if reuse:
            return torch.tensor(state["weights"], dtype=torch.float64)
        w = _nash_weights(gram.numpy())
        state.update(step=self.step, weights=w.tolist())
        return torch.from_numpy(w)


def _nash_weights(gram: np.ndarray, max_iter: int = 1000) -> np.ndarray:
    G = gram / scale_of(gram)  # first to O(1): the Frobenius norm of tiny entries underflows
    G = G / np.linalg.norm(G)
    T = G.shape[0]
    w_min = min_norm_weights(G)
    # Near stationarity α grows like 1/‖min-norm point‖; below 1e-10 of the scale, call it stationary.
    if w_min @ G @ w_min <= 1e-10 * np.max(np.diag(G)):
        return np.zeros(T)
    alpha = 1.0 / np.sqrt(np.diag(G))  # every diagonal is positive here (no zero gradient)

    def objective(a: np.ndarray) -> float:
        return 0.5 * a @ G @ a - np.log(a).sum()

    best, stalled = np.inf, 0
    for _ in range(max_iter):
        grad = G @ alpha - 1.0 / alpha
        # Relative residual of (Gα)_t α_t = 1; its floor is rounding times cond(G), so also stop
        # once it has stalled for 10 steps at a level that still pins α to 1e-5.
        residual = _residual(G, alpha)
        if residual <= 1e-10:
            return alpha
        best, stalled = (residual, 0) if residual < 0.5 * best else (best, stalled + 1)
        if stalled >= 10 and best <= 1e-5:
            return alpha
        # Newton step with the Hessian G + diag(1/α²) = D(DGD + I)D, D = diag(α): the bracket's
        # eigenvalues are ≥ 1, so duplicated or nearly dependent tasks do not make it singular.
        scaled = alpha[:, None] * G * alpha[None, :] + np.eye(T)
        step = -alpha * np.linalg.solve(scaled, alpha * grad)
        t = 1.0
        # Stay inside α > 0, then backtrack (Armijo) on the convex objective.
        neg = step < 0
        if neg.any():
            t = min(1.0, 0.99 * float(np.min(-alpha[neg] / step[neg])))
        f0, slope = objective(alpha), float(grad @ step)

        def accepted(t: float) -> bool:
            # Armijo on the objective, or — where α is large and the objective's rounding hides
            # the decrease — a smaller residual of the optimality condition.
            trial = alpha + t * step
            return objective(trial) <= f0 + 1e-4 * t * slope or _residual(G, trial) < residual

        while not accepted(t) and t > 1e-16:
            t *= 0.5
        alpha = alpha + t * step
    raise RuntimeError(f"Nash-MTL Newton iteration did not converge in {max_iter} steps")


def _residual(G: np.ndarray, alpha: np.ndarray) -> float:
    """Relative residual of the bargaining condition (Gα)_t α_t = 1."""
    return float(np.max(np.abs((G @ alpha) * alpha - 1.0)))
