"""Properties every solver's weights must have, on many random and degenerate Gram matrices.

Each property test takes exactly the solvers that declare the property (``conflict_free``,
``scale_invariant``, ``permutation_equivariant``, ``stateful``: see ``MOOSolver``): every
registered solver in its default configuration, plus the configurations in ``CASES`` whose
arguments change a declaration.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.optimize import minimize, minimize_scalar

from lightning_moo.solvers import (
    DECLARATIONS, IMTLG, MGDA, CAGrad, DualProj, MOOSolver, NashMTL, PCGrad, UPGrad, solver_class, solver_names,
)

from jacobians import jacobians, nonzero


class PCGradOnTwoTasks(PCGrad):
    """PCGrad on at most two tasks, where each gradient is projected at most once, onto the other's
    normal plane: the random order cannot matter and the sum conflicts with neither task."""

    conflict_free = True
    permutation_equivariant = True

    def weights(self, gram):
        assert gram.shape[0] <= 2, "PCGradOnTwoTasks declares its guarantees for two tasks only"
        return super().weights(gram)


@dataclass(frozen=True)
class Case:
    """A solver configuration: a fresh solver per example (stateful solvers carry nothing over)."""

    make: Callable[[], MOOSolver]
    max_tasks: int = 8


# Every registered solver as configured by default, then configurations that change a declaration.
# (Loss-based weightings take no Gram: tests/test_loss_weightings.py covers them.)
GRAM_SOLVERS = [name for name in solver_names() if solver_class(name).uses_gram]
CASES = {name: Case(solver_class(name)) for name in GRAM_SOLVERS} | {
    "mgda-l2": Case(lambda: MGDA("l2")),
    "cagrad-c1": Case(lambda: CAGrad(c=1.0)),
    "cagrad-c2": Case(lambda: CAGrad(c=2.0)),
    "pcgrad-T2": Case(lambda: PCGradOnTwoTasks(seed=3), max_tasks=2),
    "nashmtl-every2": Case(lambda: NashMTL(update_weights_every=2)),
}


def declaring(declaration: str | None = None, value: bool = True) -> list:
    """The cases whose solver declares ``declaration`` (every case for None), as pytest params."""
    return [pytest.param(case, id=name) for name, case in CASES.items()
            if declaration is None or getattr(case.make(), declaration) is value]


def solve(solver, G: np.ndarray) -> np.ndarray:
    return solver(torch.from_numpy(G)).numpy()


def same_direction(G: np.ndarray, w1: np.ndarray, w2: np.ndarray, rtol: float) -> bool:
    """Whether Jᵀw1 == Jᵀw2: ‖Jᵀ(w1 − w2)‖² = ΔᵀGΔ, compared with the scale of the directions."""
    delta = w1 - w2
    scale = np.max(np.diag(G)) * max(np.abs(w1).sum(), np.abs(w2).sum(), 1.0) ** 2
    return float(delta @ G @ delta) <= rtol * scale


@pytest.mark.parametrize("case", declaring())
@given(data=st.data())
def test_weights_are_finite_with_one_per_task(case, data):
    J = data.draw(jacobians(max_tasks=case.max_tasks))
    w = solve(case.make(), J @ J.T)
    assert w.shape == (J.shape[0],) and np.isfinite(w).all()


@pytest.mark.parametrize("case", declaring("permutation_equivariant"))
@given(data=st.data())
def test_permutation_equivariance(case, data):
    """Permuting the tasks permutes the direction's task coordinates."""
    J = data.draw(jacobians(scales=False, max_tasks=case.max_tasks))
    T = J.shape[0]
    perm = np.array(data.draw(st.permutations(range(T))))
    G = J @ J.T
    w = solve(case.make(), G)
    w_perm = solve(case.make(), G[np.ix_(perm, perm)])
    assert same_direction(G[np.ix_(perm, perm)], w[perm], w_perm, 1e-9)


@pytest.mark.parametrize("case", declaring("scale_invariant"))
@given(data=st.data(), exponent=st.integers(-20, 20))
def test_scale_invariance_of_the_direction_shape(case, data, exponent):
    """Scaling every gradient by a > 0 scales the direction by a: same weights."""
    J = data.draw(jacobians(scales=False, max_tasks=case.max_tasks))
    G = J @ J.T
    w = solve(case.make(), G)
    w_scaled = solve(case.make(), G * 10.0**exponent)
    assert same_direction(G, w, w_scaled, 1e-9)


@pytest.mark.parametrize("case", declaring("conflict_free"))
@given(data=st.data())
def test_no_conflict(case, data):
    """⟨g_t, d⟩ ≥ 0 for every task, for the methods that guarantee it, on well-posed gradients
    whose norms span two orders of magnitude."""
    J = data.draw(jacobians(max_tasks=case.max_tasks, well_posed=True, spread=1))
    G = J @ J.T
    w = solve(case.make(), G)
    assert (G @ w).min() >= -1e-7 * np.max(np.diag(G))


@pytest.mark.parametrize("case", declaring("conflict_free"))
@given(data=st.data())
def test_no_conflict_with_norms_spread_over_six_orders(case, data):
    """The same with norms spanning 1e-3 … 1e3: the small gradients' geometry then sits 1e-12
    below the Gram's leading digits, and exactly degenerate cones (a zero gradient, opposed
    pairs of very different length) need weights of 1e6; measured worst case 2.4e-5."""
    J = data.draw(jacobians(max_tasks=case.max_tasks, well_posed=True, spread=3))
    G = J @ J.T
    w = solve(case.make(), G)
    assert (G @ w).min() >= -1e-4 * np.max(np.diag(G))


@pytest.mark.parametrize("case", declaring("stateful", False))
@given(data=st.data())
def test_stateless_solvers_keep_no_state(case, data):
    """A solver declared stateless keeps nothing between calls: after other Grams, buckets and
    steps it gives a fresh solver's weights, and its state_dict stays empty."""
    used, fresh = case.make(), case.make()
    for _ in range(data.draw(st.integers(1, 3))):
        J = data.draw(jacobians(max_tasks=case.max_tasks))
        used(torch.from_numpy(J @ J.T), bucket=data.draw(st.integers(0, 3)), step=data.draw(st.integers(0, 3)))
    J = data.draw(jacobians(max_tasks=case.max_tasks))
    G = torch.from_numpy(J @ J.T)
    assert torch.equal(used(G, bucket=1, step=5), fresh(G, bucket=1, step=5))
    assert used.state_dict() == {"buckets": {}}


# The test of each declaration; a new declaration needs one.
DECLARATION_TESTS = {
    "conflict_free": [test_no_conflict, test_no_conflict_with_norms_spread_over_six_orders],
    "scale_invariant": [test_scale_invariance_of_the_direction_shape],
    "permutation_equivariant": [test_permutation_equivariance],
    "stateful": [test_stateless_solvers_keep_no_state],
}


def test_every_declaration_has_a_property_test_and_every_registered_solver_is_exercised():
    assert set(DECLARATION_TESTS) == set(DECLARATIONS)
    assert {type(case.make()) for case in CASES.values()} >= {solver_class(name) for name in GRAM_SOLVERS}


def test_declarations_that_depend_on_the_arguments():
    assert CAGrad.conflict_free is False and CAGrad().conflict_free is False and CAGrad(c=1.0).conflict_free
    assert MGDA().scale_invariant and not MGDA("l2").scale_invariant
    assert NashMTL().conflict_free and not NashMTL(update_weights_every=2).conflict_free
    for cls in (UPGrad, DualProj):
        assert cls().permutation_equivariant and not cls(pref=[1.0, 2.0]).permutation_equivariant
        assert "permutation_equivariant" not in repr(cls(pref=[1.0, 2.0]))


@given(J=jacobians())
def test_mgda_kkt_conditions(J):
    """w is on the simplex; ⟨g_t, d⟩ ≥ ‖d‖² for all t, with equality on the support."""
    assume(nonzero(J))
    G = J @ J.T
    w = solve(MGDA(), G)
    s = np.max(np.diag(G))
    assert (w >= 0).all() and abs(w.sum() - 1) < 1e-12
    norm2, inner = w @ G @ w, G @ w
    assert inner.min() >= norm2 - 1e-6 * s
    assert (inner[w > 1e-9] <= norm2 + 1e-6 * s).all()


def brute_force_min_norm(G: np.ndarray) -> float:
    """min wᵀGw over the simplex by enumerating every support: on a support S the minimiser of the
    affine hull solves the KKT system [[G_SS, 1], [1ᵀ, 0]]; keep feasible ones, take the best."""
    T, best = G.shape[0], np.inf
    for k in range(1, T + 1):
        for S in map(list, itertools.combinations(range(T), k)):
            K = np.zeros((k + 1, k + 1))
            K[:k, :k], K[:k, k], K[k, :k] = G[np.ix_(S, S)], 1, 1
            sol = np.linalg.lstsq(K, np.r_[np.zeros(k), 1.0], rcond=None)[0][:k]
            if (sol >= -1e-12).all() and abs(sol.sum() - 1) < 1e-9:
                w = np.zeros(T)
                w[S] = sol
                best = min(best, float(w @ G @ w))
    return best


@given(J=jacobians(max_tasks=6))
def test_mgda_matches_brute_force_over_supports(J):
    assume(nonzero(J))
    G = J @ J.T
    w = solve(MGDA(), G)
    # 1e-7: nearly parallel gradients (1e-7 apart) leave rounding-level ties in the support.
    assert w @ G @ w <= brute_force_min_norm(G) + 1e-7 * np.max(np.diag(G))


@given(J=jacobians(scales=False))
def test_mgda_l2_normalization_solves_on_unit_gradients(J):
    """MGDA(l2) weights divided back are MGDA weights of the unit gradients: ‖Σ v_t u_t‖ minimal."""
    norms = np.linalg.norm(J, axis=1)
    assume((norms > 1e-6).all())
    U = J / norms[:, None]
    w = solve(MGDA("l2"), J @ J.T)
    v = w * norms
    assert abs(v.sum() - 1) < 1e-9 and (v >= 0).all()
    Gu = U @ U.T
    if J.shape[0] <= 6:
        assert v @ Gu @ v <= brute_force_min_norm(Gu) + 1e-7
    else:
        assert (Gu @ v).min() >= v @ Gu @ v - 1e-6


def cagrad_primal(G: np.ndarray, w: np.ndarray, c: float) -> float:
    """CAGrad's objective F(w) = ⟨g_w, g0⟩ + c‖g0‖‖g_w‖ for simplex weights w."""
    T = G.shape[0]
    mean = np.full(T, 1 / T)
    return float(w @ G @ mean + c * np.sqrt(max(mean @ G @ mean, 0)) * np.sqrt(max(w @ G @ w, 0)))


def cagrad_reference_minimum(G: np.ndarray, c: float) -> float:
    """min of the convex F over the simplex: vertices, every edge by bounded Brent, and (T = 3)
    Nelder–Mead over the whole simplex started from the best point of a grid."""
    T = G.shape[0]
    eye = np.eye(T)
    best = min(cagrad_primal(G, e, c) for e in eye)
    for i, j in itertools.combinations(range(T), 2):
        res = minimize_scalar(lambda a: cagrad_primal(G, a * eye[i] + (1 - a) * eye[j], c),
                              bounds=(0, 1), method="bounded", options={"xatol": 1e-13})
        best = min(best, float(res.fun))
    if T == 3:
        steps = 200
        grid = np.array([(a, b, steps - a - b) for a in range(steps + 1) for b in range(steps + 1 - a)]) / steps
        mean = np.full(T, 1 / T)
        values = grid @ G @ mean + c * np.sqrt(mean @ G @ mean) * np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", grid, G, grid), 0))
        start = grid[int(np.argmin(values))]
        # Nelder–Mead on w = |x| / Σ|x|: the whole simplex, boundary included, with no constraints.
        res = minimize(lambda x: cagrad_primal(G, np.abs(x) / np.abs(x).sum(), c), start, method="Nelder-Mead",
                       options={"xatol": 1e-14, "fatol": 1e-16, "maxiter": 20000})
        best = min(best, float(res.fun), float(values.min()))
    return best


@pytest.mark.parametrize("T", [2, 3])
@pytest.mark.parametrize("c", [0.2, 0.5, 0.9, 1.5])
@settings(max_examples=max(10, settings.default.max_examples // 4))  # each example runs a reference search
@given(data=st.data())
def test_cagrad_direction_is_optimal_for_the_dual_problem(T, c, data):
    """Strong duality certificate: d (rescale=0) lies in the ball ‖d − g0‖ ≤ c‖g0‖ and
    min_t ⟨g_t, d⟩ equals the primal minimum F* = min_w ⟨g_w, g0⟩ + c‖g0‖‖g_w‖, which no d in the
    ball can exceed. F* comes from an independent grid + SciPy search."""
    J = data.draw(jacobians(min_tasks=T, max_tasks=T, max_dim=4, well_posed=True))
    G = J @ J.T
    s = np.max(np.diag(G))
    mean = np.full(T, 1 / T)
    assume(mean @ G @ mean > 0)
    w = solve(CAGrad(c=c, rescale=0), G)
    radius = c * np.sqrt(mean @ G @ mean)
    offset = w - mean
    assert np.sqrt(max(offset @ G @ offset, 0)) <= radius * (1 + 1e-7) + 1e-9 * np.sqrt(s)
    assert (G @ w).min() >= cagrad_reference_minimum(G, c) - 1e-7 * s


@given(J=jacobians(min_tasks=1, max_tasks=8, scales=False))
def test_nash_mtl_bargaining_condition(J):
    """Away from Pareto stationarity: α > 0 and (Gα)_t α_t = 1 on the Frobenius-normalised Gram."""
    G = J @ J.T
    w_mgda = solve(MGDA(), G)
    assume(nonzero(J) and w_mgda @ G @ w_mgda > 1e-6 * np.max(np.diag(G)))
    alpha = solve(NashMTL(), G)
    Gn = G / np.linalg.norm(G)
    assert (alpha > 0).all()
    np.testing.assert_allclose((Gn @ alpha) * alpha, 1.0, rtol=1e-8)


@given(data=st.data())
def test_imtlg_equal_projections_on_unit_gradients(data):
    """Full-rank Gram: Σ w = 1 and ⟨d, g_t/‖g_t‖⟩ is the same for every task."""
    T = data.draw(st.integers(2, 6))
    J = data.draw(arrays(np.float64, (T, T + data.draw(st.integers(0, 3))), elements=st.floats(-10, 10)))
    G = J @ J.T
    assume(np.linalg.cond(G) < 1e8)
    w = solve(IMTLG(), G)
    proj = (G @ w) / np.sqrt(np.diag(G))
    assert abs(w.sum() - 1) < 1e-9
    np.testing.assert_allclose(proj, proj[0], rtol=1e-6, atol=1e-9 * np.sqrt(np.max(np.diag(G))))


def test_pcgrad_orders_are_reproducible_and_depend_on_step_and_bucket():
    a, b = PCGrad(seed=1), PCGrad(seed=1)
    G = torch.eye(5, dtype=torch.float64)
    a(G, bucket=3, step=7)
    b(G, bucket=3, step=7)
    assert a.orders(5) == b.orders(5)
    b(G, bucket=4, step=7)
    c = PCGrad(seed=1)
    c(G, bucket=3, step=8)
    assert a.orders(5) != b.orders(5) and a.orders(5) != c.orders(5)


@pytest.mark.parametrize("T", [16, 32, 64])
@pytest.mark.parametrize("rank", ["full", "deficient", "ill-conditioned"])
@pytest.mark.parametrize("seed", range(3))
def test_mgda_kkt_for_many_tasks(T, rank, seed):
    """Up to 64 languages: KKT conditions to 1e-6 of the scale on full-rank, rank-deficient
    (T gradients in T/4 dimensions) and ill-conditioned (singular values 1 … 1e-8) Grams."""
    rng = np.random.default_rng(seed)
    if rank == "deficient":
        J = rng.normal(size=(T, T // 4))
    else:
        U, _ = np.linalg.qr(rng.normal(size=(T, T)))
        V, _ = np.linalg.qr(rng.normal(size=(2 * T, T)))
        sv = np.ones(T) if rank == "full" else np.logspace(0, -8, T)
        J = (U * sv) @ V.T + (0.5 if rank == "full" else 0.0) * rng.normal(size=(1, 2 * T))
    G = J @ J.T
    w = solve(MGDA(), G)
    s = np.max(np.diag(G))
    norm2, inner = w @ G @ w, G @ w
    assert (w >= 0).all() and abs(w.sum() - 1) < 1e-12
    assert inner.min() >= norm2 - 1e-6 * s
    assert (inner[w > 1e-9] <= norm2 + 1e-6 * s).all()
