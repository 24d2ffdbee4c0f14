"""Round trip: weights(J Jᵀ) applied to J equals the direction each method's published algorithm
computes on J itself. The references below work on the gradient vectors, written plainly after
the papers (and their authors' code where the paper leaves a choice), with SciPy's own solvers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize, nnls, root

from lightning_moo.solvers import MGDA, AlignedMTL, CAGrad, DualProj, IMTLG, NashMTL, PCGrad, UPGrad

CASES = [(T, seed) for T in (2, 3, 5, 8) for seed in range(3)]


def random_jacobian(T: int, seed: int, n: int = 20) -> np.ndarray:
    """Gradients sharing a common component plus noise strong enough to make some pairs conflict."""
    rng = np.random.default_rng(seed)
    common = rng.normal(size=n)
    return 0.3 * common + rng.normal(size=(T, n)) * rng.uniform(0.5, 2.0, size=(T, 1))


def ours(solver, J: np.ndarray, **context) -> np.ndarray:
    w = solver(torch.from_numpy(J @ J.T), **context).numpy()
    return w @ J


def close(d: np.ndarray, ref: np.ndarray, J: np.ndarray, rtol: float) -> None:
    scale = np.linalg.norm(J, axis=1).max()
    np.testing.assert_allclose(d, ref, rtol=0, atol=rtol * scale)


def min_norm_point(P: np.ndarray) -> np.ndarray:
    """min ‖Pᵀw‖ over the simplex, via NNLS on the stacked system [Pᵀ; 1ᵀ] u ≈ [0; 1]."""
    A = np.vstack([P.T, np.ones(P.shape[0])])
    b = np.r_[np.zeros(P.shape[1]), 1.0]
    u, _ = nnls(A, b)
    return (u / u.sum()) @ P


@pytest.mark.parametrize("T, seed", CASES)
def test_mgda(T, seed):
    J = random_jacobian(T, seed)
    close(ours(MGDA(), J), min_norm_point(J), J, 1e-9)


@pytest.mark.parametrize("T, seed", CASES)
def test_cagrad(T, seed):
    """The authors' algorithm: minimise wᵀAb + c‖g0‖ sqrt(wᵀAw) over the simplex with SLSQP,
    then d = g0 + (c‖g0‖/‖g_w‖) g_w, divided by 1 + c²."""
    J, c = random_jacobian(T, seed), 0.5
    g0 = J.mean(axis=0)
    radius = c * np.linalg.norm(g0)

    def objective(w):
        gw = w @ J
        return gw @ g0 + radius * np.linalg.norm(gw)

    best = min(
        (minimize(objective, x0, method="SLSQP", bounds=[(0, 1)] * T,
                  constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}], options={"ftol": 1e-14, "maxiter": 1000})
         for x0 in [np.full(T, 1 / T), *np.eye(T)]),
        key=lambda r: r.fun,
    )
    gw = best.x @ J
    ref = (g0 + radius / np.linalg.norm(gw) * gw) / (1 + c**2)
    close(ours(CAGrad(c=c), J), ref, J, 1e-5)  # SLSQP's own accuracy


@pytest.mark.parametrize("T, seed", CASES)
def test_pcgrad(T, seed):
    """Yu et al.'s loop on the vectors, with the orders the solver drew for this step and bucket."""
    J = random_jacobian(T, seed)
    solver = PCGrad(seed=11)
    d = ours(solver, J, bucket=5, step=9)
    projected = []
    for i, order in enumerate(solver.orders(T)):
        g = J[i].copy()
        for j in order:
            dot = g @ J[j]
            if dot < 0:
                g -= dot / (J[j] @ J[j]) * J[j]
        projected.append(g)
    close(d, np.sum(projected, axis=0), J, 1e-12)


@pytest.mark.parametrize("T, seed", CASES)
def test_imtlg(T, seed):
    """Liu et al.'s closed form: D = [g1 − gt], U = [u1 − ut] (t ≥ 2), α₂:T = g1 Uᵀ (D Uᵀ)⁻¹."""
    J = random_jacobian(T, seed)
    U = J / np.linalg.norm(J, axis=1, keepdims=True)
    D, Ud = J[0] - J[1:], U[0] - U[1:]
    alpha_rest = J[0] @ Ud.T @ np.linalg.inv(D @ Ud.T)
    alpha = np.r_[1 - alpha_rest.sum(), alpha_rest]
    close(ours(IMTLG(), J), alpha @ J, J, 1e-9)


def project_onto_dual_cone(J: np.ndarray, g: np.ndarray) -> np.ndarray:
    """argmin ‖x − g‖ s.t. Jx ≥ 0: by duality x = g + Jᵀu with u = argmin_{u≥0} ‖g + Jᵀu‖."""
    u, _ = nnls(J.T, -g)
    return g + J.T @ u


@pytest.mark.parametrize("T, seed", CASES)
def test_upgrad(T, seed):
    J = random_jacobian(T, seed)
    ref = np.mean([project_onto_dual_cone(J, J[i]) for i in range(T)], axis=0)
    close(ours(UPGrad(), J), ref, J, 1e-9)


@pytest.mark.parametrize("T, seed", CASES)
def test_dualproj(T, seed):
    J = random_jacobian(T, seed)
    close(ours(DualProj(), J), project_onto_dual_cone(J, J.mean(axis=0)), J, 1e-9)


@pytest.mark.parametrize("T, seed", CASES)
def test_aligned_mtl(T, seed):
    """Senushkin et al.: J = UΣVᵀ, aligned Ĵ = σ_min U Vᵀ, d = Ĵᵀ1."""
    J = random_jacobian(T, seed)
    U, S, Vt = np.linalg.svd(J, full_matrices=False)
    close(ours(AlignedMTL(), J), S.min() * (Vt.T @ U.T @ np.ones(T)), J, 1e-9)


@pytest.mark.parametrize("T, seed", CASES)
def test_nash_mtl(T, seed):
    """Navon et al.: α with (GᵀG α)_t = 1/α_t for the normalised Gram, solved here by SciPy's root
    finder on the vectors (Jᵀα, then J(Jᵀα)); the equation has roots with negative entries too,
    the bargaining solution is the positive one."""
    J = random_jacobian(T, seed)
    norm = np.linalg.norm(J @ J.T)
    starts = [np.sqrt(norm) / np.linalg.norm(J, axis=1), np.ones(T)]
    residual = lambda a: J @ (J.T @ a) / norm - 1 / a  # noqa: E731
    sols = [root(residual, x0, tol=1e-14) for x0 in starts]
    # Judged by the residual, not s.success: SciPy reports "xtol too small" even at a residual of 1e-16.
    positive = [s.x for s in sols if (s.x > 0).all() and np.abs(residual(s.x)).max() < 1e-12]
    assert positive
    close(ours(NashMTL(), J), positive[0] @ J, J, 1e-7)
