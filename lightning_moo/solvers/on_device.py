"""Exact MGDA and CAGrad on the gradients' device: no host round trip, so no CUDA stall inside the backward.

The host solvers (:mod:`.qp`) are active-set methods: each iteration's next move depends on the last
one's numbers, which on a GPU means copying the Gram to the host and waiting for every kernel queued
before it. For a few tasks the min-norm problem ``min_{w ∈ simplex} wᵀGw`` can instead be solved
exactly by enumeration, with no data-dependent control flow:

* the optimum lies in the relative interior of one face of the simplex, and by Carathéodory a face
  whose gradients are affinely independent (its KKT system is then non-singular) holds it;
* on a support S the optimum of the face solves ``G_SS w_S = μ 1``, ``1ᵀw_S = 1``;
* every candidate with ``w_S ≥ 0`` is a feasible point, so the lowest objective over all
  ``2^T − 1`` supports is the optimum (to rounding): no KKT test, no branch.

The systems are Jacobi-scaled (unit diagonal; zero gradients keep a zero row) and solved batched
(``torch.linalg.solve_ex``, which reports singular systems in a tensor instead of raising). Costs
``2^T`` small solves: meant for T ≤ :data:`MAX_TASKS`, above which the host solver is used.

CAGrad's dual ``min_{w ∈ simplex} F(w) = wᵀb + r‖Jᵀw‖`` (``b = G·1/T``, ``r = c‖g0‖``) is convex
and, on a support S with ``‖Jᵀw‖ = s > 0``, its KKT conditions are ``G_SS w = β1 − α b_S`` with
``α = s/r`` and ``1ᵀw = 1``: the same KKT matrix as MGDA's, whose solution is affine in α,
``w(α) = w₀ + α w₁``, and ``w(α)ᵀG w(α) = r²α²`` is a quadratic equation in α. Every root with
``w ≥ 0``, and every MGDA candidate ``w₀``, is a point of the simplex; the lowest F among them is the
optimum. (When that optimum has ``Jᵀw = 0`` the direction is the projection of ``g0`` onto the
dual cone, ``min_{v ≥ 1/T} vᵀGv``, enumerated the same way.)
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Largest task count solved by enumeration (4095 systems of 13×13).
MAX_TASKS = 12

_SUPPORTS: dict[tuple[int, torch.device], Tensor] = {}
# A support whose solution has a weight below this (after scaling to the simplex) is not feasible;
# rounding-level negatives of a feasible face are clipped, and the objective is then evaluated at
# the clipped point, so accepting them can never return a point worse than a feasible one.
_NEGATIVE_TOLERANCE = 1e-9


def _supports(num_tasks: int, device: torch.device) -> Tensor:
    """[2^T − 1, T] float64 indicator rows of every non-empty subset of the tasks."""
    key = (num_tasks, device)
    if key not in _SUPPORTS:
        # Built on the device: a copy from host memory would wait for the device (a blocking copy).
        codes = torch.arange(1, 2**num_tasks, device=device)
        bits = (codes[:, None] >> torch.arange(num_tasks, device=device)[None, :]) & 1
        _SUPPORTS[key] = bits.to(torch.float64)
    return _SUPPORTS[key]


def _prepare(gram: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Symmetric float64 Gram scaled to a unit largest diagonal (zeros where not finite); the
    Jacobi scaling ``d``; whether the Gram is finite; whether any gradient is non-zero."""
    G = gram.to(torch.float64)
    G = 0.5 * (G + G.T)
    finite = torch.isfinite(G).all()
    G = torch.where(finite, G, torch.zeros_like(G))
    diag = G.diagonal().clamp_min(0)
    scale = diag.max()
    has_gradient = scale > 0
    scale = torch.where(has_gradient, scale, torch.ones_like(scale))
    G = G / scale
    d = torch.where(diag > 0, (diag / scale).rsqrt(), torch.ones_like(diag))
    return G, d, finite, has_gradient


def _face_solutions(G: Tensor, d: Tensor, linear: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
    """For every support S: the solution ``w₀`` of ``G_SS w = β1, 1ᵀw = 1`` (MGDA's face optimum)
    and, given ``linear`` (b), ``w₁`` of ``G_SS w = β1 − b_S, 1ᵀw = 0``; zero off S. With the
    success flag of each system ([K, T], [K, T] or None, [K])."""
    T = G.shape[0]
    S = _supports(T, G.device)
    K = S.shape[0]
    scaled = G * d[:, None] * d[None, :]
    # KKT system in v (w = D v): [DGD_SS, -d_S; d_Sᵀ, 0]; v_i = 0 off the support.
    system = torch.zeros(K, T + 1, T + 1, dtype=torch.float64, device=G.device)
    system[:, :T, :T] = S[:, :, None] * S[:, None, :] * scaled + torch.diag_embed(1 - S)
    system[:, :T, T] = -S * d
    system[:, T, :T] = S * d
    rhs = torch.zeros(K, T + 1, 1 if linear is None else 2, dtype=torch.float64, device=G.device)
    rhs[:, T, 0] = 1.0
    if linear is not None:
        rhs[:, :T, 1] = -S * d * linear
    solution, info = torch.linalg.solve_ex(system, rhs)
    w = d[None, :, None] * solution[:, :T, :]
    ok = (info == 0) & torch.isfinite(w).all(dim=(1, 2))
    return w[..., 0], (None if linear is None else w[..., 1]), ok


def _on_simplex(w: Tensor, ok: Tensor) -> tuple[Tensor, Tensor]:
    """Candidates clipped to the simplex, and which of them were feasible (to rounding)."""
    valid = ok & (w >= -_NEGATIVE_TOLERANCE).all(1)
    w = w.clamp_min(0)
    w = w / w.sum(1, keepdim=True)
    return w, valid & torch.isfinite(w).all(1)


def _lowest(candidates: Tensor, valid: Tensor, objective: Tensor) -> Tensor:
    """The valid candidate with the lowest objective, chosen without a host read."""
    objective = torch.where(valid & torch.isfinite(objective), objective, torch.full_like(objective, float("inf")))
    return candidates.index_select(0, objective.argmin().view(1))[0]


def _check_size(gram: Tensor) -> None:
    if gram.shape[0] > MAX_TASKS:
        raise ValueError(f"enumeration solves at most {MAX_TASKS} tasks, got {gram.shape[0]}")


def min_norm_weights_on_device(gram: Tensor) -> Tensor:
    """MGDA's weights for a T×T Gram (T ≤ :data:`MAX_TASKS`), computed where ``gram`` lives.

    Float64 [T] on ``gram``'s device; uniform when every gradient is zero; NaN when the Gram has a
    non-finite entry (the caller checks after the backward, see
    :meth:`~lightning_moo.reducer.BucketReducer.check_step`).
    """
    _check_size(gram)
    G, d, finite, has_gradient = _prepare(gram)
    w0, _, ok = _face_solutions(G, d)
    w, valid = _on_simplex(w0, ok)
    best = _lowest(w, valid, torch.einsum("ki,ij,kj->k", w, G, w))
    best = torch.where(has_gradient, best, torch.full_like(best, 1.0 / gram.shape[0]))
    return torch.where(finite, best, torch.full_like(best, float("nan")))


def cagrad_weights_on_device(gram: Tensor, c: float) -> Tensor:
    """CAGrad's weights ``1/T + (r/s) w`` (before the rescale divisor) for a T×T Gram, computed
    where ``gram`` lives; NaN for a non-finite Gram. See the module docstring."""
    _check_size(gram)
    T = gram.shape[0]
    G, d, finite, has_gradient = _prepare(gram)
    mean = torch.full((T,), 1.0 / T, dtype=torch.float64, device=G.device)
    b = G @ mean  # ⟨g_t, g0⟩
    r = c * (mean @ b).clamp_min(0).sqrt()  # c‖g0‖
    w0, w1, ok = _face_solutions(G, d, b)
    # w(α)ᵀG w(α) = r²α²:  qa α² + qb α + qc = 0.
    qa = torch.einsum("ki,ij,kj->k", w1, G, w1) - r**2
    qb = 2 * torch.einsum("ki,ij,kj->k", w0, G, w1)
    qc = torch.einsum("ki,ij,kj->k", w0, G, w0)
    root = (qb**2 - 4 * qa * qc).clamp_min(0).sqrt()
    alphas = torch.stack([(-qb + root) / (2 * qa), (-qb - root) / (2 * qa), -qc / qb])
    linear_case = qa.abs() <= 1e-12 * (qa.abs() + r**2)  # qa = 0: one root of the linear equation
    usable = torch.stack([~linear_case, ~linear_case, linear_case]) & (alphas > 0) & torch.isfinite(alphas)
    roots = w0[None] + alphas.nan_to_num(0.0)[..., None] * w1[None]
    candidates = torch.cat([w0, roots.reshape(-1, T)])
    candidates, valid = _on_simplex(candidates, torch.cat([ok, (usable & ok[None]).reshape(-1)]))
    norm2 = torch.einsum("ki,ij,kj->k", candidates, G, candidates).clamp_min(0)
    w = _lowest(candidates, valid, candidates @ b + r * norm2.sqrt())
    s2 = w @ G @ w
    # A minimiser shorter than 1e-6 of the longest gradient, or whose squared norm is within 1e4
    # rounding errors of the Gram entries it comes from, is g_w = 0 (as the host solver decides).
    noise = 1e4 * 64 * T * torch.finfo(torch.float64).eps * (w.abs() @ G.abs() @ w.abs())
    resolved = (s2 > 1e-12) & (s2 > noise)
    s = s2.clamp_min(1e-300).sqrt()
    moved = mean + (r / s) * w
    weights = torch.where(resolved, moved, _dual_cone_projection(G, d, mean))
    weights = torch.where(r > 0, weights, mean)
    weights = torch.where(has_gradient, weights, mean)
    return torch.where(finite, weights, torch.full_like(weights, float("nan")))


def _dual_cone_projection(G: Tensor, d: Tensor, u: Tensor) -> Tensor:
    """``v = argmin_{v ≥ u} vᵀGv`` (the projection of ``Jᵀu`` onto the dual cone) by enumerating
    the supports of ``y = v − u ≥ 0``: ``G_SS y_S = −(G u)_S``; plus ``y = 0``."""
    T = G.shape[0]
    S = _supports(T, G.device)
    scaled = G * d[:, None] * d[None, :]
    system = S[:, :, None] * S[:, None, :] * scaled + torch.diag_embed(1 - S)
    rhs = (-S * d * (G @ u))[..., None]
    solution, info = torch.linalg.solve_ex(system, rhs)
    y = d * solution[..., 0]
    valid = (info == 0) & torch.isfinite(y).all(1) & (y >= -_NEGATIVE_TOLERANCE).all(1)
    v = torch.cat([u[None], u + y.clamp_min(0)])
    valid = torch.cat([torch.ones(1, dtype=torch.bool, device=G.device), valid])
    return _lowest(v, valid, torch.einsum("ki,ij,kj->k", v, G, v))
