"""FairGrad and ConFIG against independent computations on explicit gradient vectors, their
defining equations, and their documented degenerate behaviour. (The declared guarantees are
checked for every registered solver in test_solver_properties.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog, minimize, nnls, root

from lightning_moo.solvers import MGDA, ConFIG, FairGrad, NashMTL, get_solver, solver_class

from jacobians import jacobians

CASES = [(T, seed) for T in (2, 3, 5, 8) for seed in range(3)]
ALPHAS = [0.5, 1.0, 2.0, 5.0]
EPS = np.finfo(np.float64).eps


def random_jacobian(T: int, seed: int, n: int = 20) -> np.ndarray:
    """Gradients sharing a common component plus noise strong enough to make some pairs conflict,
    with norms spread over a factor of ten."""
    rng = np.random.default_rng(seed)
    common = rng.normal(size=n)
    return (0.3 * common + rng.normal(size=(T, n))) * rng.uniform(0.3, 3.0, size=(T, 1))


def weights(solver, J: np.ndarray) -> np.ndarray:
    return solver(torch.from_numpy(J @ J.T)).numpy()


def close(d: np.ndarray, ref: np.ndarray, J: np.ndarray, rtol: float) -> None:
    np.testing.assert_allclose(d, ref, rtol=0, atol=rtol * np.linalg.norm(J, axis=1).max())


# --- FairGrad -------------------------------------------------------------------------------------

def fairgrad_root(J: np.ndarray, alpha: float) -> np.ndarray:
    """The positive root of J(Jᵀw) = w^(−1/α) by SciPy's root finders on the vectors, in the
    variable x = log w (which keeps w positive) as (J(Jᵀe^x))·e^(x/α) − 1 = 0, from the
    single-task solutions and from ones; judged by its residual, not SciPy's status flag."""
    norms2 = np.einsum("ij,ij->i", J, J)

    def residual(x):
        with np.errstate(over="ignore", invalid="ignore"):  # a wild trial step
            w = np.exp(x)
            return (J @ (J.T @ w)) * w ** (1.0 / alpha) - 1.0

    for method in ("hybr", "lm"):
        for x0 in (norms2 ** (-alpha / (1 + alpha)), np.ones(len(J)) / np.sqrt(norms2.max())):
            sol = root(residual, np.log(x0), method=method, tol=1e-15)
            if np.abs(residual(sol.x)).max() < 1e-12:
                return np.exp(sol.x)
    raise AssertionError("SciPy found no positive root")


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("T, seed", CASES)
def test_fairgrad_matches_scipy_root_and_solves_the_equation(T, seed, alpha):
    J = random_jacobian(T, seed)
    G = J @ J.T
    w = weights(FairGrad(alpha=alpha), J)
    assert (w > 0).all()
    np.testing.assert_allclose((G @ w) * w ** (1 / alpha), 1.0, rtol=0, atol=1e-9)
    ref = fairgrad_root(J, alpha)
    np.testing.assert_allclose(w, ref, rtol=1e-9)
    close(w @ J, ref @ J, J, 1e-9)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("T, seed", [(2, 0), (3, 1), (5, 2)])
def test_fairgrad_direction_is_the_alpha_fair_allocation(T, seed, alpha):
    """The paper's problem on the vectors: max_d Σ u_t^(1−α)/(1−α) (Σ log u_t for α = 1),
    u_t = ⟨g_t, d⟩ > 0, over the unit ball (SLSQP); its maximiser is the direction of d."""
    J = random_jacobian(T, seed, n=6)

    def utility(d):
        u = np.maximum(J @ d, 1e-300)
        return -np.log(u).sum() if alpha == 1 else -(u ** (1 - alpha)).sum() / (1 - alpha)

    start = np.linalg.lstsq(J, np.ones(T), rcond=None)[0]  # ⟨g_t, d⟩ = 1: feasible
    res = minimize(utility, start / np.linalg.norm(start), method="SLSQP",
                   constraints=[{"type": "ineq", "fun": lambda d: 1 - d @ d},
                                {"type": "ineq", "fun": lambda d: J @ d - 1e-12}],
                   options={"ftol": 1e-15, "maxiter": 2000})
    d = weights(FairGrad(alpha=alpha), J) @ J
    assert np.linalg.norm(d / np.linalg.norm(d) - res.x / np.linalg.norm(res.x)) < 1e-6


@pytest.mark.parametrize("T, seed", CASES)
def test_fairgrad_with_alpha_one_is_nash_mtl_without_its_normalisation(T, seed):
    """Nash-MTL solves (G/‖G‖_F) a = 1/a, so a = √‖G‖_F · w with G w = 1/w."""
    J = random_jacobian(T, seed)
    G = J @ J.T
    np.testing.assert_allclose(weights(FairGrad(alpha=1.0), J) * np.sqrt(np.linalg.norm(G)),
                               weights(NashMTL(), J), rtol=1e-8)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("c", [1e-12, 1e-3, 7.0, 1e9])
def test_fairgrad_scaling_law(alpha, c):
    """G → cG scales w by c^(−α/(1+α)) exactly: the direction's shape is scale-invariant, its
    weights are not (hence no scale_invariant declaration)."""
    J = random_jacobian(4, 7)
    G = torch.from_numpy(J @ J.T)
    w, w_scaled = FairGrad(alpha=alpha)(G).numpy(), FairGrad(alpha=alpha)(c * G).numpy()
    np.testing.assert_allclose(w_scaled, c ** (-alpha / (1 + alpha)) * w, rtol=1e-10)
    assert not FairGrad.scale_invariant


@pytest.mark.parametrize("alpha", ALPHAS)
def test_fairgrad_single_task_closed_form(alpha):
    # ‖g‖² w = w^(−1/α) → w = ‖g‖^(−2α/(1+α)); g = (3, −4), ‖g‖ = 5.
    w = FairGrad(alpha=alpha)(torch.tensor([[25.0]], dtype=torch.float64)).numpy()
    np.testing.assert_allclose(w, [5.0 ** (-2 * alpha / (1 + alpha))], rtol=1e-14)


def test_fairgrad_two_orthogonal_gradients_closed_form():
    # G = diag(4, 1), α = 2: 4 w1 = w1^(−1/2) → w1 = 4^(−2/3); w2 = 1.
    G = torch.tensor([[4.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    np.testing.assert_allclose(FairGrad()(G).numpy(), [4.0 ** (-2 / 3), 1.0], rtol=1e-14)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_fairgrad_ignores_zero_gradients(alpha):
    J = random_jacobian(3, 4)
    with_zero = np.insert(J, 1, 0.0, axis=0)
    w = weights(FairGrad(alpha=alpha), with_zero)
    assert w[1] == 0.0
    np.testing.assert_allclose(np.delete(w, 1), weights(FairGrad(alpha=alpha), J), rtol=1e-12)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_fairgrad_has_no_allocation_at_pareto_stationarity(alpha):
    # Zero in the hull (g3 = −(g1 + g2)/2 after scaling): no positive solution, no update.
    J = np.array([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0], [-1.0, -1.0, -1.0]])
    assert np.array_equal(weights(FairGrad(alpha=alpha), J), np.zeros(3))


@given(J=jacobians(max_tasks=6), alpha=st.sampled_from([0.2, 0.5, 1.0, 2.0, 5.0, 20.0]))
def test_fairgrad_equation_holds_to_the_grams_precision(J, alpha):
    """Away from Pareto stationarity every non-zero gradient gets w_t > 0 with
    (Gw)_t w_t^(1/α) = 1 to 1e-9, or to the rounding of (Gw)_t where it cancels."""
    G = J @ J.T
    live = np.diag(G) > 0
    Gl = G[np.ix_(live, live)]
    assume(live.any())
    w_min = MGDA()(torch.from_numpy(Gl)).numpy()
    assume(w_min @ Gl @ w_min > 1e-6 * np.max(np.diag(Gl)))
    w = weights(FairGrad(alpha=alpha), J)
    assert (w[~live] == 0).all() and (w[live] > 0).all()
    wl, p = w[live], 1 / alpha
    floor = 100 * len(wl) * EPS * (np.abs(Gl) @ wl) * wl**p
    assert (np.abs((Gl @ wl) * wl**p - 1) <= np.maximum(1e-9, floor)).all()


@pytest.mark.parametrize("alpha", [2.0, 5.0, 20.0])
def test_fairgrad_converges_with_weights_eleven_orders_apart(alpha):
    """A rank-deficient Gram Hypothesis found (g3 = 3·g1 − 0.005·g2, norms 0.005, 1, 0.016):
    the solution has w_1 ~ 1e4 next to w_3 ~ 1e-5, where a potential evaluated as a difference of
    totals could not see the decrease of a step on the small weights and the iteration stalled."""
    J = np.array([[0.005, 0.0], [0.0, 1.0], [0.015, -0.005]])
    G = J @ J.T
    w = weights(FairGrad(alpha=alpha), J)
    assert (w > 0).all()
    np.testing.assert_allclose((G @ w) * w ** (1 / alpha), 1.0, rtol=0, atol=1e-9)
    np.testing.assert_allclose(w, fairgrad_root(J, alpha), rtol=1e-8)


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf")])
def test_fairgrad_rejects_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        FairGrad(alpha=alpha)


# --- ConFIG ---------------------------------------------------------------------------------------

def config_paper(J: np.ndarray) -> np.ndarray:
    """The paper's operator on the vectors: v = pinv([u_1 … u_T]ᵀ) 1, v̂ = v/‖v‖,
    d = (Σ_t ⟨g_t, v̂⟩) v̂."""
    U = J / np.linalg.norm(J, axis=1, keepdims=True)
    v = np.linalg.pinv(U) @ np.ones(len(J))
    v_hat = v / np.linalg.norm(v)
    return (J @ v_hat).sum() * v_hat


def cosines(J: np.ndarray, d: np.ndarray) -> np.ndarray:
    return (J @ d) / np.linalg.norm(J, axis=1) / np.linalg.norm(d)


@pytest.mark.parametrize("T, seed", CASES)
def test_config_matches_the_papers_vector_form(T, seed):
    J = random_jacobian(T, seed)
    d = weights(ConFIG(), J) @ J
    close(d, config_paper(J), J, 1e-10)
    cos = cosines(J, d)
    assert cos.min() > 0 and np.ptp(cos) < 1e-12
    # The length rule: ‖d‖ = Σ_t ‖g_t‖ cos(g_t, d).
    np.testing.assert_allclose(np.linalg.norm(d), np.linalg.norm(J, axis=1) @ cos, rtol=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_config_two_task_closed_form(seed):
    """The paper's form for two losses: g_v = U[U(O(g1, g2)) + U(O(g2, g1))] with the
    orthogonality operator O(a, b) = b − (aᵀb/‖a‖²) a; d = (g1ᵀg_v + g2ᵀg_v) g_v."""
    g1, g2 = random_jacobian(2, seed)

    def unit(x):
        return x / np.linalg.norm(x)

    def orth(a, b):
        return b - (a @ b) / (a @ a) * a

    g_v = unit(unit(orth(g1, g2)) + unit(orth(g2, g1)))
    J = np.stack([g1, g2])
    close(weights(ConFIG(), J) @ J, (g1 @ g_v + g2 @ g_v) * g_v, J, 1e-12)


def test_config_rank_deficient_without_conflict_is_the_papers_least_squares():
    # Three gradients in a plane with all least-squares cosines positive (but unequal: no
    # direction has equal cosines with e1, e2 and (1, 1)).
    J = np.array([[2.0, 0.0, 0.0], [0.0, 0.5, 0.0], [3.0, 3.0, 0.0]])
    d = weights(ConFIG(), J) @ J
    close(d, config_paper(J), J, 1e-12)
    assert cosines(J, d).min() > 0 and np.ptp(cosines(J, d)) > 1e-3


def projected_onto_dual_cone(J: np.ndarray) -> np.ndarray:
    """Reference for the conflicting rank-deficient case: the paper's least-squares v on the
    vectors, projected onto {x : Jx ≥ 0} (x = v + Uᵀy, y = argmin_{y≥0} ‖v + Uᵀy‖ by SciPy's
    NNLS on the vectors), then the paper's normalisation and length rule."""
    U = J / np.linalg.norm(J, axis=1, keepdims=True)
    v = np.linalg.pinv(U) @ np.ones(len(J))
    y, _ = nnls(U.T, -v)
    x_hat = (v + U.T @ y) / np.linalg.norm(v + U.T @ y)
    return (J @ x_hat).sum() * x_hat


@pytest.mark.parametrize("seed", range(12))
def test_config_projects_a_conflicting_least_squares_direction_onto_the_dual_cone(seed):
    """More gradients than dimensions, drawn until the paper's least-squares direction conflicts
    with some task (and some direction improves every task): ours conflicts with none and is
    that direction's projection onto the dual cone, with the paper's length rule."""
    rng = np.random.default_rng(seed)
    while True:
        T = int(rng.integers(3, 7))
        J = rng.normal(size=(T, int(rng.integers(2, T)))) * rng.uniform(0.2, 5.0, size=(T, 1))
        U = J / np.linalg.norm(J, axis=1, keepdims=True)
        improving = linprog(np.zeros(J.shape[1]), A_ub=-U, b_ub=-np.ones(T), bounds=(None, None)).status == 0
        if improving and (J @ config_paper(J)).min() < -1e-6 * np.linalg.norm(J, axis=1).max() ** 2:
            break
    d = weights(ConFIG(), J) @ J
    assert (J @ d).min() >= -1e-12 * np.linalg.norm(J, axis=1).max() ** 2
    close(d, projected_onto_dual_cone(J), J, 1e-10)


def test_config_opposed_and_positively_dependent_gradients_give_no_update():
    opposed = np.array([[1.0, 2.0], [-2.0, -4.0]])
    triangle = np.array([[1.0, 0.0], [-0.5, 0.8], [-0.5, -0.8]])  # a positive combination is 0
    for J in (opposed, triangle):
        assert np.array_equal(weights(ConFIG(), J), np.zeros(len(J)))


def test_config_ignores_zero_gradients():
    J = random_jacobian(3, 5)
    w = weights(ConFIG(), np.insert(J, 2, 0.0, axis=0))
    assert w[2] == 0.0
    np.testing.assert_allclose(np.delete(w, 2), weights(ConFIG(), J), rtol=1e-12)


def test_config_pinned_two_orthogonal_gradients():
    # g1 = (2, 0), g2 = (0, 1): v̂ = (1, 1)/√2, length 2/√2 + 1/√2 → d = (1.5, 1.5): w = (0.75, 1.5).
    G = torch.tensor([[4.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    np.testing.assert_allclose(ConFIG()(G).numpy(), [0.75, 1.5], rtol=1e-14)


def test_config_rtol():
    # Two unit gradients 1e-4 apart in angle: C's small eigenvalue 1 − cos(1e-4) ≈ 5e-9 is below
    # the default cutoff T·eps_f32·λ_max ≈ 4.8e-7 (treated as parallel: d along their mean) and
    # above rtol=1e-12 (solved exactly: the bisector). Both give equal cosines here.
    J = np.array([[1.0, 0.0], [np.cos(1e-4), np.sin(1e-4)]])
    for solver in (ConFIG(), ConFIG(rtol=1e-12)):
        d = weights(solver, J) @ J
        assert np.ptp(cosines(J, d)) < 1e-12 and cosines(J, d).min() > 0.99
    with pytest.raises(ValueError, match="rtol"):
        ConFIG(rtol=1.5)


# --- registration ---------------------------------------------------------------------------------

def test_registered_names_and_declarations():
    assert solver_class("fairgrad") is FairGrad and solver_class("FairGrad") is FairGrad
    assert solver_class("config") is ConFIG and solver_class("ConFIG") is ConFIG
    assert get_solver("fairgrad", alpha=0.5).alpha == 0.5 and FairGrad().alpha == 2.0
    assert FairGrad().declarations() == {
        "conflict_free": True, "scale_invariant": False, "permutation_equivariant": True, "stateful": False}
    assert ConFIG().declarations() == {
        "conflict_free": True, "scale_invariant": True, "permutation_equivariant": True, "stateful": False}


@settings(max_examples=50)
@given(J=jacobians(max_tasks=6, well_posed=True))
def test_config_cosines_equal_whenever_one_is_in_the_range(J):
    """Where some direction has equal positive cosines with all non-zero gradients, ConFIG's
    has."""
    norms = np.linalg.norm(J, axis=1)
    live = norms > 0
    assume(live.any())
    U = J[live] / norms[live, None]
    x = np.linalg.lstsq(U, np.ones(live.sum()), rcond=None)[0]
    assume(np.abs(U @ x - 1).max() < 1e-9 and np.linalg.svd(U, compute_uv=False).min() ** 2 > 1e-3)
    d = weights(ConFIG(), J) @ J
    cos = cosines(J[live], d)
    assert cos.min() > 0 and np.ptp(cos) < 1e-9


def same_direction(G: np.ndarray, w1: np.ndarray, w2: np.ndarray, rtol: float) -> bool:
    delta = w1 - w2
    scale = np.max(np.diag(G)) * max(np.abs(w1).sum(), np.abs(w2).sum(), 1.0) ** 2
    return float(delta @ G @ delta) <= rtol * scale


@given(data=st.data(), alpha=st.sampled_from([0.2, 0.5, 1.0, 5.0, 20.0]))
def test_fairgrad_declarations_hold_for_every_alpha(data, alpha):
    """test_solver_properties checks the default α = 2; the same guarantees for other α:
    no conflict (norms over six orders) and permutation equivariance."""
    J = data.draw(jacobians(well_posed=True, spread=3))
    G = J @ J.T
    w = weights(FairGrad(alpha=alpha), J)
    assert (G @ w).min() >= -1e-12 * np.max(np.diag(G))
    J = data.draw(jacobians(scales=False))
    perm = np.array(data.draw(st.permutations(range(len(J)))))
    G = J @ J.T
    w, w_perm = weights(FairGrad(alpha=alpha), J), weights(FairGrad(alpha=alpha), J[perm])
    assert same_direction(G[np.ix_(perm, perm)], w[perm], w_perm, 1e-9)
