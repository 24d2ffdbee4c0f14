"""Exact small quadratic programs on Gram matrices (float64 NumPy, T ≤ a few hundred).

Two problems cover every QP-based solver here:

* :func:`nnls_gram` — ``min_{u ≥ 0} ½ uᵀQu + qᵀu`` for PSD ``Q``, by the Lawson–Hanson active-set
  method written on ``Q`` itself (it only ever needs ``AᵀA`` and ``Aᵀb``, i.e. Gram entries).
* :func:`min_norm_weights` — the min-norm point of the convex hull of the gradients,
  ``min_{w ∈ simplex} wᵀGw``, reduced exactly to an NNLS:
  ``min_{u ≥ 0} ‖Jᵀu‖² + (1ᵀu − 1)²`` has the solution ``u = w*/(1 + ‖Jᵀw*‖²)``
  (write ``u = s·w`` with ``w`` on the simplex and minimise over ``s``: the value is
  ``δ/(1 + δ)`` with ``δ = ‖Jᵀw‖²``, increasing in ``δ``), so ``w* = u/1ᵀu``.

Active-set methods terminate with the exact optimum of a finite sequence of linear solves, unlike
Frank–Wolfe whose error decays like 1/k. The tests hold MGDA's KKT conditions to 1e-6 of the
largest squared gradient norm and its objective to brute force over supports; on random Grams
the KKT residual is ~1e-12, and up to ~1e-7 where gradients agree to 1e-7 in direction or span
twelve orders of magnitude in norm (the Gram then holds no more digits).
"""

from __future__ import annotations

import numpy as np

_EPS = np.finfo(np.float64).eps


def scale_of(gram: np.ndarray) -> float:
    """Largest squared gradient norm: the natural unit of a Gram matrix."""
    return float(np.max(np.diag(gram))) if gram.size else 0.0


def nnls_gram(Q: np.ndarray, q: np.ndarray, max_iter: int | None = None) -> np.ndarray:
    """Solve ``min_{u ≥ 0} ½ uᵀQu + qᵀu`` for a symmetric PSD ``Q`` (Lawson–Hanson, Gram form).

    The objective must be bounded below on the orthant (true for every caller here).
    """
    n = q.shape[0]
    max_iter = max_iter if max_iter is not None else 10 * n + 20
    q_abs = float(np.abs(q).max(initial=0.0))
    Q_abs = float(np.abs(Q).max(initial=0.0))
    u = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    # Coordinates whose addition the last try rejected: in exact arithmetic adding a coordinate
    # with a positive negative-gradient always lowers the objective; in floating point a
    # rounding-level gradient may not, and retrying it would cycle. Cleared whenever u moves.
    blocked = np.zeros(n, dtype=bool)
    for _ in range(max_iter):
        neg_grad = -(Q @ u + q)
        # A gradient within a few ulps of the terms it is computed from is zero.
        tol = 10 * n * _EPS * (q_abs + Q_abs * float(u.sum()))
        candidates = ~passive & ~blocked & (neg_grad > tol)
        if not candidates.any():
            return u
        j = int(np.argmax(np.where(candidates, neg_grad, -np.inf)))
        trial = passive.copy()
        trial[j] = True
        new_u, new_passive = _descend(Q, q, u, trial)
        if new_u[j] <= 0 or not _decreases(Q, q, u, new_u):
            blocked[j] = True
            continue
        u, passive = new_u, new_passive
        blocked[:] = False
    raise RuntimeError(f"Lawson–Hanson NNLS did not converge in {max_iter} iterations (n={n})")


def _descend(Q: np.ndarray, q: np.ndarray, u: np.ndarray, passive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lawson–Hanson inner loop: from a feasible ``u``, step towards the unconstrained optimum of
    the passive set until the first passive coordinate hits zero, drop it, re-solve; it ends at
    the optimum of a passive set with all coordinates positive."""
    passive = passive.copy()
    z = _solve_on(Q, q, passive)
    while not (z[passive] > 0).all():
        idx = np.flatnonzero(passive & (z <= 0))
        gap = u[idx] - z[idx]
        steps = np.divide(u[idx], gap, out=np.zeros_like(gap), where=gap > 0)  # u = z = 0: drop at once
        alpha = float(steps.min())
        u = u + alpha * (z - u)
        passive[idx[steps <= alpha]] = False
        passive &= u > 0
        u[~passive] = 0.0
        z = _solve_on(Q, q, passive)
    return z, passive


def _decreases(Q: np.ndarray, q: np.ndarray, old: np.ndarray, new: np.ndarray) -> bool:
    """Whether ``new`` lowers the objective by more than rounding error.

    The change is computed from the step itself, ``Δᵀ(Q·old + q) + ½ ΔᵀQΔ``, not as a difference of
    two objective values, so that small but real improvements are not lost in the objective's
    own rounding (the MGDA reduction adds a constant-sized ``(1ᵀu − 1)²`` term).
    """
    step = new - old
    grad = Q @ old + q
    linear, quadratic = float(step @ grad), 0.5 * float(step @ Q @ step)
    # Rounding bound of each gradient entry, weighted by how far that coordinate moves.
    grad_noise = 10 * q.shape[0] * _EPS * (np.abs(Q) @ np.abs(old) + np.abs(q))
    noise = float(np.abs(step) @ grad_noise) + 4 * _EPS * (abs(linear) + abs(quadratic))
    return linear + quadratic < -noise


def _solve_on(Q: np.ndarray, q: np.ndarray, passive: np.ndarray) -> np.ndarray:
    """Unconstrained minimiser over the passive coordinates (others zero); least-norm if singular."""
    z = np.zeros(q.shape[0])
    idx = np.flatnonzero(passive)
    if idx.size:
        # Jacobi scaling to a unit diagonal first: gradients whose norms differ by orders of
        # magnitude make Q badly scaled (not nearly singular), and the least-squares cutoff
        # would otherwise drop the small ones' directions.
        d = 1.0 / np.sqrt(np.maximum(np.diag(Q)[idx], np.finfo(np.float64).tiny))
        A = Q[np.ix_(idx, idx)] * d[:, None] * d[None, :]
        z[idx] = d * np.linalg.lstsq(A, -q[idx] * d, rcond=None)[0]
    return z


def min_norm_weights(gram: np.ndarray) -> np.ndarray:
    """Weights ``w`` on the simplex minimising ``wᵀ gram w`` (the MGDA min-norm problem).

    The min-norm point ``Jᵀw`` is unique; ``w`` is unique only when the gradients of its support
    are affinely independent, otherwise one optimal ``w`` is returned.
    """
    T = gram.shape[0]
    if T == 1:
        return np.ones(1)
    scale = scale_of(gram)
    if scale <= 0:
        return np.full(T, 1.0 / T)
    G = gram / scale
    if T == 2:
        return _min_norm_two(G)
    u = nnls_gram(G + 1.0, -np.ones(T))
    total = u.sum()
    if total <= 0:
        raise RuntimeError("min-norm NNLS returned the zero vector; the Gram matrix is not PSD")
    return u / total


def _min_norm_two(G: np.ndarray) -> np.ndarray:
    """Closed form for T = 2: the minimiser of ‖γ g1 + (1−γ) g2‖² clipped to [0, 1]."""
    denom = G[0, 0] + G[1, 1] - 2 * G[0, 1]
    if denom <= 0:  # identical gradients: every point of the segment is the same vector
        return np.array([0.5, 0.5])
    gamma = float(np.clip((G[1, 1] - G[0, 1]) / denom, 0.0, 1.0))
    return np.array([gamma, 1.0 - gamma])
