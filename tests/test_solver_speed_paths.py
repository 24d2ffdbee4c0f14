"""The fast paths of the exact solvers against independent computations: warm-started and block-
pivoting NNLS against SciPy's NNLS, MGDA against brute force over supports, CAGrad's face-wise
root against the Brent root finder it replaced (kept here as the reference), UPGrad against
SciPy's NNLS on the vectors, and the NumPy validation of the Gram matrix. No timing here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import brentq, nnls

from lightning_moo.solvers import MGDA, CAGrad, UPGrad, check_gram
from lightning_moo.solvers.qp import LawsonHanson, min_norm_weights, nnls_gram, psd_root, scale_of
from lightning_moo.solvers.upgrad import project_onto_dual_cone

from jacobians import jacobians, nonzero
from test_solver_properties import brute_force_min_norm

FAMILIES = ("random", "hard-conflict", "rank-deficient", "ill-conditioned", "duplicated", "zero")


def jacobian(family: str, T: int, seed: int, n: int = 40) -> np.ndarray:
    """The benchmark's families (smaller), plus duplicated and zero gradients."""
    rng = np.random.default_rng([seed, T, FAMILIES.index(family)])
    if family == "random":
        return 0.3 * rng.normal(size=(1, n)) + rng.normal(size=(T, n))
    if family == "hard-conflict":
        shared = 2.0 * rng.normal(size=(1, n))
        J = shared + rng.normal(size=(T, n))
        J[T // 2:] -= 1.5 * shared
        return J
    if family == "rank-deficient":
        r = max(1, T // 2)
        return rng.normal(size=(T, r)) @ rng.normal(size=(r, n))
    if family == "ill-conditioned":
        U, _ = np.linalg.qr(rng.normal(size=(T, T)))
        V, _ = np.linalg.qr(rng.normal(size=(n, T)))
        return (U * np.logspace(0, -8, T)) @ V.T
    J = rng.normal(size=(T, n)) * 10.0 ** rng.integers(-2, 3, size=(T, 1))
    if family == "duplicated":
        J[T // 2:] = J[: T - T // 2].copy()
    else:
        J[rng.integers(T)] = 0.0
    return J


CASES = [(family, T, seed) for family in FAMILIES for T in (3, 5, 8, 12) for seed in range(4)]


def nnls_objective(Q: np.ndarray, q: np.ndarray, u: np.ndarray) -> float:
    return float(0.5 * u @ Q @ u + q @ u)


@pytest.mark.parametrize("family, T, seed", CASES)
def test_nnls_with_any_start_matches_scipy(family, T, seed):
    """Every starting guess (block pivoting, then Lawson–Hanson) ends where the cold start does,
    and at SciPy's NNLS optimum of ‖Au − b‖² (in Gram form Q = AᵀA, q = −Aᵀb) where the problem is
    well-conditioned: with norms over twelve orders of magnitude and a generic b, the optimum has
    entries ~1e12 that neither method resolves to 1e-10 (the solvers' own problems are scaled)."""
    rng = np.random.default_rng(seed)
    A = jacobian(family, T, seed).T
    A /= np.sqrt(scale_of(A.T @ A))
    b = rng.normal(size=A.shape[0])
    Q, q = A.T @ A, -A.T @ b
    solver = LawsonHanson(Q)
    cold = solver.solve(q)
    np.testing.assert_array_equal(nnls_gram(Q, q), cold)
    best = nnls_objective(Q, q, cold)
    if family in ("random", "hard-conflict", "rank-deficient"):
        best = nnls_objective(Q, q, nnls(A, b)[0])
        assert nnls_objective(Q, q, cold) <= best + 1e-10 * max(1.0, abs(best))
    for start in [np.ones(T, bool), np.zeros(T, bool), q < 0, rng.random(T) < 0.5]:
        u = solver.solve(q, start=start)
        assert (u >= 0).all()
        assert nnls_objective(Q, q, u) <= best + 1e-10 * max(1.0, abs(best))


@pytest.mark.parametrize("family, T, seed", CASES)
def test_psd_root_is_a_square_root_with_the_rank_as_rows(family, T, seed):
    """RᵀR = Q to rounding, with as many rows as Q's rank where that rank is exact (the Jacobian
    built with fewer independent rows than tasks)."""
    J = jacobian(family, T, seed)
    Q = J @ J.T / scale_of(J @ J.T) if J.any() else J @ J.T
    R = psd_root(Q)
    np.testing.assert_allclose(R.T @ R, Q, rtol=0, atol=1e-13)
    exact_rank = {"rank-deficient": max(1, T // 2), "duplicated": T - T // 2}.get(family)
    if exact_rank is not None:
        assert R.shape[0] == exact_rank


@pytest.mark.parametrize("family, T, seed", CASES)
def test_nnls_from_any_compiled_guess_ends_at_the_optimum(family, T, seed, monkeypatch):
    """With a root the result is the optimum whatever the guess is: SciPy's (taken only where it
    meets the KKT conditions on Q), or a wrong one (which the method descends from); one problem
    at a time and several at once (``solve_rows``, whose guesses are tested together). ``b`` in
    the range of ``A``, as in the solvers' problems (q = Gu), so that the optimum is bounded even
    on the ill-conditioned family; the first problem's optimum is zero."""
    rng = np.random.default_rng(seed)
    A = jacobian(family, T, seed).T
    A /= np.sqrt(scale_of(A.T @ A))
    Q = A.T @ A
    X = rng.normal(size=(4, T))
    X[0] = 0.0
    qs = -(X @ Q)
    best = [nnls_objective(Q, q, LawsonHanson(Q).solve(q)) for q in qs]
    if family in ("random", "hard-conflict", "rank-deficient"):
        best = [min(o, nnls_objective(Q, q, nnls(A, A @ x)[0])) for o, q, x in zip(best, qs, X)]

    def check(us: np.ndarray) -> None:
        for u, q, o in zip(us, qs, best):
            assert (u >= 0).all()
            assert nnls_objective(Q, q, u) <= o + 1e-10 * max(1.0, abs(o))

    def rooted() -> LawsonHanson:
        return LawsonHanson(Q, root=lambda: psd_root(Q))

    for start in [lambda q: None, lambda q: np.ones(T, bool), lambda q: q < 0]:
        check([rooted().solve(q, start=start(q), rhs=lambda R, x=x: R @ x) for q, x in zip(qs, X)])
    check(rooted().solve_rows(qs, qs < 0, rhs=lambda R: X @ R.T))
    for wrong in [3 * rng.random(T), np.where(rng.random(T) < 0.5, 1e3, 0.0)]:
        monkeypatch.setattr(LawsonHanson, "_compiled_guess", lambda self, b, wrong=wrong: wrong.copy())
        check([rooted().solve(q, rhs=lambda R, x=x: R @ x) for q, x in zip(qs, X)])
        check(rooted().solve_rows(qs, np.zeros_like(qs, dtype=bool), rhs=lambda R: X @ R.T))


@pytest.mark.parametrize("family, T, seed", [c for c in CASES if c[1] <= 8])
def test_mgda_matches_brute_force_and_kkt(family, T, seed):
    J = jacobian(family, T, seed)
    G = J @ J.T
    s = np.max(np.diag(G))
    w = MGDA()(torch.from_numpy(G)).numpy()
    norm2, inner = w @ G @ w, G @ w
    assert (w >= 0).all() and abs(w.sum() - 1) < 1e-12
    assert inner.min() >= norm2 - 1e-9 * s and (inner[w > 1e-9] <= norm2 + 1e-9 * s).all()
    assert norm2 <= brute_force_min_norm(G) + 1e-10 * s


@settings(max_examples=200)
@given(J=jacobians(max_tasks=7), data=st.data())
def test_min_norm_with_any_guessed_support_is_the_min_norm(J, data):
    """A guessed support (CAGrad's warm start) changes the path, never the min-norm point."""
    G = J @ J.T
    if not nonzero(J) or J.shape[0] < 3:
        return
    s = np.max(np.diag(G))
    start = np.array(data.draw(st.lists(st.booleans(), min_size=J.shape[0], max_size=J.shape[0])))
    w = min_norm_weights(G, start=start)
    assert (w >= 0).all() and abs(w.sum() - 1) < 1e-12
    assert w @ G @ w <= brute_force_min_norm(G) + 1e-7 * s


def cagrad_brent_reference(G: np.ndarray, c: float) -> np.ndarray:
    """The CAGrad weights as computed before the face-wise root (rescale=0): Brent's method on
    ‖x(s)‖/s − 1 inside the same decade bracket, each evaluation a cold min-norm solve."""
    G = G / scale_of(G)
    T = G.shape[0]
    mean = np.full(T, 1.0 / T)
    r = c * float(np.sqrt(max(mean @ G @ mean, 0.0)))
    if r <= 0:
        return mean
    hi = float(np.sqrt(np.max(np.diag(G))))

    def projection(s: float) -> np.ndarray:
        beta = np.full(T, -(s / r) / T)
        Gb = G @ beta
        return min_norm_weights(G - Gb[:, None] - Gb[None, :] + beta @ Gb)

    def ratio_minus_one(s: float) -> tuple[float, bool]:
        w = projection(s)
        norm2 = float(w @ G @ w)
        resolved = norm2 > 1e4 * 64 * T * np.finfo(float).eps * float(np.abs(w) @ np.abs(G) @ np.abs(w))
        return np.sqrt(max(norm2, 0.0)) / s - 1.0, resolved

    s = 0.0
    if ratio_minus_one(hi)[0] >= 0:
        s = hi
    else:
        upper = hi
        for _ in range(6):
            lower = upper / 10
            value, resolved = ratio_minus_one(lower)
            if not resolved:
                break
            if value > 0:
                s = brentq(lambda t: ratio_minus_one(t)[0], lower, upper, xtol=1e-15 * hi, rtol=4 * np.finfo(float).eps)
                break
            upper = lower
    return mean + (r / s) * projection(s) if s > 0 else project_onto_dual_cone(G, mean)


@pytest.mark.parametrize("c", [0.2, 0.5, 0.9])
@pytest.mark.parametrize("family, T, seed", CASES)
def test_cagrad_matches_the_brent_reference(family, T, seed, c):
    J = jacobian(family, T, seed)
    G = J @ J.T
    w = CAGrad(c=c, rescale=0)(torch.from_numpy(G)).numpy()
    delta = w - cagrad_brent_reference(G, c)
    assert float(delta @ G @ delta) <= 1e-12 * np.max(np.diag(G))


@pytest.mark.parametrize("family, T, seed", CASES + [("pinned", 5, 0)] + [(f, T, 0) for f in FAMILIES for T in (16, 32)])
def test_upgrad_matches_scipy_projections(family, T, seed):
    # pinned: zero gradients, whose weight SciPy's NNLS on the Gram's square root leaves free (it
    # once came back as 1.6e15 and widened the optimality check until a conflicting answer passed).
    J = np.array([[1.0, -1.0], [0.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 1.0]]) if family == "pinned" else jacobian(family, T, seed)
    ref = np.mean([J[i] + J.T @ nnls(J.T, -J[i])[0] for i in range(T)], axis=0)  # each g_i onto {x : Jx ≥ 0}
    d = UPGrad()(torch.from_numpy(J @ J.T)).numpy() @ J
    np.testing.assert_allclose(d, ref, rtol=0, atol=1e-8 * np.linalg.norm(J, axis=1).max())


@pytest.mark.parametrize("make", [
    lambda G: G.float(), lambda G: G.T.contiguous().T, lambda G: G.numpy(), lambda G: G.to(torch.int64),
    lambda G: G + 1e-9 * torch.triu(torch.ones_like(G), 1),
])
def test_check_gram_returns_a_symmetric_float64_copy(make):
    J = torch.randn(4, 6, dtype=torch.float64)
    gram = make(J @ J.T)
    checked = check_gram(gram)
    reference = torch.as_tensor(gram).to(torch.float64)
    assert checked.dtype == torch.float64 and checked.device.type == "cpu"
    torch.testing.assert_close(checked, 0.5 * (reference + reference.T), rtol=0, atol=0)
    checked += 1.0  # a copy: the caller's matrix is untouched
    torch.testing.assert_close(torch.as_tensor(gram).to(torch.float64), reference, rtol=0, atol=0)


def test_float64_input_keeps_its_dtype_and_float32_round_trips():
    G = torch.eye(3, dtype=torch.float64)
    assert MGDA()(G).dtype == torch.float64 and MGDA()(G.float()).dtype == torch.float32
