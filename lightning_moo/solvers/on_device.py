"""Exact MGDA on the gradients' device: no host round trip, so no CUDA stall inside the backward.

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
        codes = torch.arange(1, 2**num_tasks)
        bits = (codes[:, None] >> torch.arange(num_tasks)[None, :]) & 1
        _SUPPORTS[key] = bits.to(device=device, dtype=torch.float64)
    return _SUPPORTS[key]


def min_norm_weights_on_device(gram: Tensor) -> Tensor:
    """MGDA's weights for a T×T Gram (T ≤ :data:`MAX_TASKS`), computed where ``gram`` lives.

    Float64 [T] on ``gram``'s device; uniform when every gradient is zero; NaN when the Gram has a
    non-finite entry (the caller checks after the backward, see
    :meth:`~lightning_moo.reducer.BucketReducer.check_step`).
    """
    T = gram.shape[0]
    if T > MAX_TASKS:
        raise ValueError(f"enumeration solves at most {MAX_TASKS} tasks, got {T}")
    G = gram.to(torch.float64)
    G = 0.5 * (G + G.T)
    finite = torch.isfinite(G).all()
    G = torch.where(finite, G, torch.zeros_like(G))
    diag = G.diagonal().clamp_min(0)
    scale = diag.max()
    has_gradient = scale > 0
    G = G / torch.where(has_gradient, scale, torch.ones_like(scale))
    d = torch.where(diag > 0, (diag / torch.where(has_gradient, scale, 1.0)).rsqrt(), torch.ones_like(diag))
    scaled = G * d[:, None] * d[None, :]

    S = _supports(T, G.device)
    K = S.shape[0]
    # KKT system of min vᵀ(DGD)v s.t. dᵀv = 1 on support S (w = D v); v_i = 0 off the support.
    system = torch.zeros(K, T + 1, T + 1, dtype=torch.float64, device=G.device)
    system[:, :T, :T] = S[:, :, None] * S[:, None, :] * scaled + torch.diag_embed(1 - S)
    system[:, :T, T] = -S * d
    system[:, T, :T] = S * d
    rhs = torch.zeros(K, T + 1, 1, dtype=torch.float64, device=G.device)
    rhs[:, T] = 1.0
    solution, info = torch.linalg.solve_ex(system, rhs)
    w = d * solution[:, :T, 0]
    valid = (info == 0) & torch.isfinite(w).all(1) & (w >= -_NEGATIVE_TOLERANCE).all(1)
    w = w.clamp_min(0)
    w = w / w.sum(1, keepdim=True)
    objective = torch.einsum("ki,ij,kj->k", w, G, w)
    objective = torch.where(valid & torch.isfinite(objective), objective, torch.full_like(objective, float("inf")))
    best = w.index_select(0, objective.argmin().view(1))[0]
    uniform = torch.full_like(best, 1.0 / T)
    best = torch.where(has_gradient, best, uniform)
    return torch.where(finite, best, torch.full_like(best, float("nan")))
