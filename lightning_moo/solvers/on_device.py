"""Exact MGDA and CAGrad on the gradients' device: no host round trip, so no CUDA stall inside the backward.

The host solvers (:mod:`.qp`) are active-set methods: each iteration's next move depends on the last
one's numbers, which on a GPU means copying the Gram to the host and waiting for every kernel queued
before it. For a few tasks the min-norm problem ``min_{w ∈ simplex} wᵀGw`` can instead be solved
exactly by enumeration, with no data-dependent control flow:

* the optimum lies in the relative interior of one face of the simplex, and by Carathéodory a face
  whose gradients are affinely independent (its KKT system is then non-singular) holds it;
* on a support S the optimum of the face solves ``G_SS w = μ 1``, ``1ᵀw = 1``;
* every candidate with ``w_S ≥ 0`` is a feasible point, so the lowest objective over all
  ``2^T − 1`` supports is the optimum (to rounding): no KKT test, no branch.

The systems are Jacobi-scaled (unit diagonal; zero gradients keep a zero row) and solved batched
(``torch.linalg.solve_ex``, which reports singular systems in a tensor instead of raising). Costs
``2^T`` small solves: meant for T ≤ :data:`MAX_TASKS`, above which the host solver is used.

CAGrad's dual ``min_{w ∈ simplex} F(w) = wᵀb + r‖Jᵀw‖`` (``b = G·1/T``, ``r = c‖g0‖``) is convex
and, on a support S with ``‖Jᵀw‖ = s > 0``, its KKT conditions are ``G_SS w = β1 − α b_S`` with
``α = s/r`` and ``1ᵀw = 1``: the same KKT matrix as MGDA's, whose solution is affine in α,
``w(α) = w₀ + α w₁``, and ``w(α)ᵀG w(α) = r²α²`` is a quadratic equation in α. Every root, and every
MGDA candidate ``w₀`` (α = 0), that lies on the simplex is a feasible point; the lowest F among them
is the optimum, so a root that is not the optimum's can only lose. (When that optimum has
``Jᵀw = 0`` the direction is the projection of ``g0`` onto the dual cone, ``min_{v ≥ 1/T} vᵀGv``,
enumerated the same way, in the same batched solve.)

On CUDA every operator is a kernel launch the host pays for, bucket after bucket, while the
backward waits for its own launches: the solvers keep their operator count low (the systems'
Gram-independent entries are built once per task count and device, one batched solve serves all
of CAGrad's systems; ``benchmarks/solver_speed.py --on-device`` counts them).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

#: Largest task count solved by enumeration (4095 systems of 13×13).
MAX_TASKS = 12

# A support whose solution has a weight below this (after scaling to the simplex) is not feasible;
# rounding-level negatives of a feasible face are clipped, and the objective is then evaluated at
# the clipped point, so accepting them can never return a point worse than a feasible one.
_NEGATIVE_TOLERANCE = 1e-9


class _Systems(NamedTuple):
    """What the enumeration's systems hold whatever the Gram, for T tasks on one device.

    Rows ``[0, K)`` of the batch are the KKT systems of the K = 2^T − 1 supports, rows ``[K, 2K)``
    the dual-cone systems of the same supports. Each is ``mask ⊙ B + off`` for the bordered matrix
    ``B = [DGD, −d; dᵀ, 0]``: ``mask`` keeps the support's entries (and, for KKT, the border), ``off``
    fixes every other unknown to zero (the dual-cone systems have no multiplier)."""

    mask: Tensor  # [2K, T+1, T+1]
    off: Tensor  # [2K, T+1, T+1]
    border: Tensor  # [T+1, T+1]: −1 in the last column, +1 in the last row (scaled by d into B)
    unit: Tensor  # [K, T+1, 1]: MGDA's right-hand side, 1ᵀw = 1
    rhs: Tensor  # [2K, T+1, 2]: CAGrad's right-hand sides without −b_S: e_T in the KKT systems' first column
    rhs_column: Tensor  # [2K, 1, 2]: where −b_S goes (the KKT systems' second column, the dual-cone systems' first)
    neg_support: Tensor  # [2K, T+1]: −S with a zero multiplier slot
    one: Tensor  # [1]
    zero: Tensor  # [1]
    signs: Tensor  # [2, 1]: the quadratic formula's ±
    zero_row: Tensor  # [1, K]: α = 0, the MGDA candidates


_SYSTEMS: dict[tuple[int, torch.device], _Systems] = {}


def _systems(num_tasks: int, device: torch.device) -> _Systems:
    key = (num_tasks, device)
    if key not in _SYSTEMS:
        _SYSTEMS[key] = _build_systems(num_tasks, device)
    return _SYSTEMS[key]


def _build_systems(T: int, device: torch.device) -> _Systems:
    # Built on the device from scratch: a copy from host memory would wait for the device.
    f64 = dict(dtype=torch.float64, device=device)
    codes = torch.arange(1, 2**T, device=device)
    S = ((codes[:, None] >> torch.arange(T, device=device)[None, :]) & 1).to(torch.float64)
    K = S.shape[0]
    ones, zeros = torch.ones(K, 1, **f64), torch.zeros(K, 1, **f64)
    kkt, dual = torch.cat([S, ones], 1), torch.cat([S, zeros], 1)
    mask = torch.cat([kkt[:, :, None] * kkt[:, None, :], dual[:, :, None] * dual[:, None, :]])
    off = torch.cat([torch.diag_embed(torch.cat([1 - S, zeros], 1)), torch.diag_embed(torch.cat([1 - S, ones], 1))])
    border = torch.zeros(T + 1, T + 1, **f64)
    border[:T, T], border[T, :T] = -1.0, 1.0
    rhs = torch.zeros(2 * K, T + 1, 2, **f64)
    rhs[:K, T, 0] = 1.0
    rhs_column = torch.zeros(2 * K, 1, 2, **f64)
    rhs_column[:K, 0, 1], rhs_column[K:, 0, 0] = 1.0, 1.0
    signs = torch.ones(2, 1, **f64)
    signs[1] = -1.0
    return _Systems(
        mask, off, border, rhs[:K, :, :1].contiguous(), rhs, rhs_column, -torch.cat([dual, dual]),
        torch.ones(1, **f64), torch.zeros(1, **f64), signs, torch.zeros(1, K, **f64),
    )


def _finite(x: Tensor) -> Tensor:
    """Elementwise finiteness in two kernels (``torch.isfinite`` is four): ``x·0`` is NaN for ±inf and NaN."""
    return x * 0 == 0


def _prepare(gram: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Symmetric float64 Gram scaled to a unit largest diagonal (zeros where not finite); the
    Jacobi scaling ``d``; whether the Gram is finite; whether any gradient is non-zero."""
    G = gram.to(torch.float64)
    G = 0.5 * (G + G.T)
    finite = _finite(G).all()
    G = torch.where(finite, G, 0.0)
    scale = G.diagonal().max()
    has_gradient = scale > 0
    G = G / torch.where(has_gradient, scale, 1.0)
    diag = G.diagonal()
    d = torch.where(diag > 0, diag.rsqrt(), 1.0)  # a squared norm ≤ 0 is a zero gradient
    return G, d, finite, has_gradient


def _solve(systems: _Systems, count: int, G: Tensor, d: Tensor, rhs: Tensor) -> tuple[Tensor, Tensor]:
    """The first ``count`` systems for ``G`` solved in one batch: their unknowns ``w = D v``
    ([count, T, columns]) and which systems were non-singular ([count])."""
    T = G.shape[0]
    dd = torch.cat([d, systems.one])
    bordered = (F.pad(G, (0, 1, 0, 1)) + systems.border) * (dd[:, None] * dd)
    matrices = torch.addcmul(systems.off[:count], systems.mask[:count], bordered)
    solution, info = torch.linalg.solve_ex(matrices, rhs)
    return solution[:, :T] * d[:, None], info == 0


def _on_simplex(w: Tensor, ok: Tensor) -> tuple[Tensor, Tensor]:
    """Candidates (rows of ``w``) clipped to the simplex, and which of them were feasible (to rounding)."""
    valid = ok & (w >= -_NEGATIVE_TOLERANCE).all(-1)
    w = w.clamp_min(0)
    w = w / w.sum(-1, keepdim=True)
    return w, valid & _finite(w).all(-1)


def _quadratic(w: Tensor, G: Tensor) -> Tensor:
    """``wₖᵀ G wₖ`` for every row."""
    return ((w @ G) * w).sum(-1)


def _lowest(candidates: Tensor, valid: Tensor, objective: Tensor) -> Tensor:
    """The valid candidate with the lowest objective, chosen without a host read. (A valid candidate
    is a finite simplex point and G has entries of at most 1, so its objective is finite.)"""
    objective = torch.where(valid, objective, float("inf"))
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
    T = gram.shape[0]
    G, d, finite, has_gradient = _prepare(gram)
    systems = _systems(T, G.device)
    w, ok = _solve(systems, 2**T - 1, G, d, systems.unit)
    w, valid = _on_simplex(w[..., 0], ok)
    best = _lowest(w, valid, _quadratic(w, G))
    best = torch.where(has_gradient, best, 1.0 / T)
    return torch.where(finite, best, float("nan"))


def cagrad_weights_on_device(gram: Tensor, c: float) -> Tensor:
    """CAGrad's weights ``1/T + (r/s) w`` (before the rescale divisor) for a T×T Gram, computed
    where ``gram`` lives; NaN for a non-finite Gram. See the module docstring."""
    _check_size(gram)
    T = gram.shape[0]
    K = 2**T - 1
    G, d, finite, _ = _prepare(gram)  # no gradient: b = 0, so r = 0 and the weights are the mean
    systems = _systems(T, G.device)
    b = G.mean(1)  # ⟨g_t, g0⟩
    r = c * b.mean().clamp_min(0).sqrt()  # c‖g0‖
    # One batch: the KKT systems for w₀ (1ᵀw = 1) and w₁ (−b_S), the dual-cone systems (−(G·1/T)_S = −b_S).
    minus_b = systems.neg_support * torch.cat([d * b, systems.zero])
    W, ok = _solve(systems, 2 * K, G, d, torch.addcmul(systems.rhs, systems.rhs_column, minus_b[..., None]))
    w0, w1 = W[:K, :, 0], W[:K, :, 1]
    # w(α)ᵀG w(α) = r²α² with qa = w₁ᵀGw₁ − r², qb = 2 w₀ᵀGw₁, qc = w₀ᵀGw₀; α = 0 gives w₀ itself.
    Q = W[:K].mT @ G @ W[:K]
    qa, qb, qc = Q[:, 1, 1] - r * r, Q[:, 0, 1] + Q[:, 1, 0], Q[:, 0, 0]
    root = (qb * qb - 4 * qa * qc).clamp_min(0).sqrt()
    alphas = torch.cat([systems.zero_row, (systems.signs * root - qb) / (2 * qa), (-qc / qb)[None]])
    candidates, valid = _on_simplex(w0 + alphas[..., None] * w1, ok[:K])  # non-finite roots are not feasible
    candidates, valid = candidates.reshape(-1, T), valid.reshape(-1)
    norm = _quadratic(candidates, G).clamp_min(0).sqrt()
    w = _lowest(candidates, valid, candidates @ b + r * norm)
    s2 = w @ G @ w
    # A minimiser shorter than 1e-6 of the longest gradient, or whose squared norm is within 1e4
    # rounding errors of the Gram entries it comes from, is g_w = 0 (as the host solver decides).
    noise = 1e4 * 64 * T * torch.finfo(torch.float64).eps * (w @ G.abs() @ w)  # w ≥ 0
    resolved = (s2 > 1e-12) & (s2 > noise)
    moved = (r / s2.clamp_min(1e-300).sqrt()) * w + 1.0 / T
    weights = torch.where(resolved, moved, _dual_cone_projection(W[K:, :, 0], ok[K:], G))
    weights = torch.where(r > 0, weights, 1.0 / T)
    return torch.where(finite, weights, float("nan"))


def _dual_cone_projection(y: Tensor, ok: Tensor, G: Tensor) -> Tensor:
    """``v = argmin_{v ≥ u} vᵀGv`` for ``u = 1/T`` (the projection of ``g0`` onto the dual cone),
    given every support's solution ``y`` of ``G_SS y_S = −(G u)_S``: the best of ``u + y`` and ``u``.

    Unlike the simplex points above, ``v`` is unbounded: a support whose ``G_SS`` is singular but
    not exactly so solves to enormous weights along the Gram's null space, whose objective is
    pure rounding and can come out below the optimum's. Candidates are therefore ranked by an
    upper bound of their objective, the computed value plus its rounding error bound."""
    T = G.shape[0]
    valid = ok & _finite(y).all(1) & (y >= -_NEGATIVE_TOLERANCE).all(1)
    v = torch.cat([torch.full_like(y[:1], 1.0 / T), y.clamp_min(0) + 1.0 / T])
    valid = torch.cat([torch.ones_like(valid[:1]), valid])
    rounding = 64 * T * torch.finfo(torch.float64).eps * _quadratic(v, G.abs())  # v ≥ 0
    return _lowest(v, valid, _quadratic(v, G) + rounding)
