"""UPGrad and DualProj (Quinton & Rey, 2024): projections onto the dual cone of the gradients."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .base import MOOSolver
from .qp import LawsonHanson, psd_root, scale_of


def project_onto_dual_cone(G: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Weights ``v`` with ``Jᵀv`` the projection of ``Jᵀu`` onto the dual cone ``{x : Jx ≥ 0}``.

    By duality ``v = argmin_{v ≥ u} vᵀGv``; with ``v = u + y`` this is an NNLS in ``y``.
    The result has ``Gv ≥ 0``: the projected direction conflicts with no gradient.
    """
    return project_rows_onto_dual_cone(G, u[None, :])[0]


def project_rows_onto_dual_cone(G: np.ndarray, U: np.ndarray) -> np.ndarray:
    """:func:`project_onto_dual_cone` of every row of ``U``, sharing the preparation of ``G``.

    Each NNLS starts from the constraints its vector violates, ``{t : (Gu)_t < 0}``: projecting
    ``Jᵀu`` makes exactly those active when the violated gradients are not too correlated, so the
    usual solve is one linear system and the optimality check. On Grams singular to working
    precision (more tasks than the gradients' rank, or nearly so) that guess fails and every
    projection starts from SciPy's compiled NNLS instead, the guesses checked together (see
    :meth:`~lightning_moo.solvers.qp.LawsonHanson.solve_rows`): 20–40 NumPy-bound active-set steps
    per projection become one compiled call. A vector already in the cone (``Gu ≥ 0``) is its own
    projection, without a solve.
    """
    G = G / scale_of(G)
    nnls = LawsonHanson(G, root=lambda: psd_root(G))
    # The linear terms q = Gu are −Rᵀb for b = −Ru: the least-squares form, without a solve.
    linear = U @ G
    return U + nnls.solve_rows(linear, linear < 0, rhs=lambda R: -(U @ R.T))


class UPGrad(MOOSolver):
    """Unconflicting Projection of Gradients: project every gradient onto the dual cone and
    average the projections (``pref`` weights them; default uniform ``1/T``).

    Declarations: conflict-free (a non-negative combination of points of the dual cone is in
    it); scale-invariant; permutation-equivariant without ``pref`` (a ``pref`` is tied to task
    positions); stateless."""

    name = "upgrad"
    conflict_free = True
    scale_invariant = True
    permutation_equivariant = True
    stateful = False

    def __init__(self, pref: list[float] | None = None) -> None:
        super().__init__()
        self.pref = pref
        self.permutation_equivariant = pref is None

    def weights(self, gram: Tensor) -> Tensor:
        G = gram.numpy()
        T = G.shape[0]
        pref = _preference(self.pref, T)
        return torch.from_numpy(pref @ project_rows_onto_dual_cone(G, np.eye(T)))


class DualProj(MOOSolver):
    """Project the (``pref``-weighted, default mean) combination onto the dual cone.

    Declarations: as :class:`UPGrad` (conflict-free, scale-invariant, permutation-equivariant
    without ``pref``, stateless)."""

    name = "dualproj"
    conflict_free = True
    scale_invariant = True
    permutation_equivariant = True
    stateful = False

    def __init__(self, pref: list[float] | None = None) -> None:
        super().__init__()
        self.pref = pref
        self.permutation_equivariant = pref is None

    def weights(self, gram: Tensor) -> Tensor:
        G = gram.numpy()
        return torch.from_numpy(project_onto_dual_cone(G, _preference(self.pref, G.shape[0])))


def _preference(pref: list[float] | None, T: int) -> np.ndarray:
    if pref is None:
        return np.full(T, 1.0 / T)
    p = np.asarray(pref, dtype=np.float64)
    if p.shape != (T,) or (p < 0).any():
        raise ValueError(f"pref must be {T} non-negative numbers (one per task), got {pref}")
    return p
