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
Frank–Wolfe whose error decays like 1/k. At T ≤ a few dozen each NumPy call costs more than its
arithmetic, so the count of solves is what matters: a guessed support is first improved by block
principal pivoting (many coordinates swapped per solve), Lawson–Hanson (one coordinate per solve)
checks or finishes the result, and the solves are Cholesky factorisations of the Jacobi-scaled
passive block, with least squares where that block is singular to working precision. Where block
pivoting fails or is bound to (a Gram singular to working precision: more tasks than the
gradients' rank, or singular values down to 1e-8) MGDA and UPGrad/DualProj start instead from
SciPy's compiled NNLS on the least-squares form of their problem, with a pivoted-Cholesky root of
the Gram (:func:`psd_root`), taken only where it passes the KKT test on the Gram itself (else
Lawson–Hanson descends from it). The tests
hold MGDA's KKT conditions to 1e-6 of the largest squared gradient norm and its objective to brute force over supports; on random Grams
the KKT residual is ~1e-12, and up to ~1e-7 where gradients agree to 1e-7 in direction or span
twelve orders of magnitude in norm (the Gram then holds no more digits).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import optimize
from scipy.linalg import lapack

_EPS = np.finfo(np.float64).eps
_TINY = np.finfo(np.float64).tiny


def scale_of(gram: np.ndarray) -> float:
    """Largest squared gradient norm: the natural unit of a Gram matrix."""
    return float(gram.diagonal().max()) if gram.size else 0.0


def eigh(A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors of a small symmetric matrix, by LAPACK's dsyevd
    through SciPy: ``np.linalg.eigh`` at T ≈ 32 hands the work to threads that, right after a
    multi-threaded torch op, can wait milliseconds for the cores torch's idle threads spin on."""
    lam, V, info = lapack.dsyevd(A)
    if info != 0:
        raise np.linalg.LinAlgError(f"eigendecomposition did not converge (LAPACK dsyevd info={info})")
    return lam, V


def psd_root(Q: np.ndarray) -> np.ndarray:
    """A matrix ``R`` (rank × n) with ``RᵀR = Q`` to rounding, for a symmetric PSD ``Q``, by LAPACK's
    pivoted Cholesky (dpstrf): it stops where the remaining diagonal is below ``10·n·eps·max(diag)``,
    the rounding of a Gram matrix's entries (LAPACK's default, half of ``n·eps``, kept rank-one
    rounding residues as rows), so its rows are the numerical rank. A tenth of an
    eigendecomposition's time at n = 32."""
    factor, piv, rank, info = lapack.dpstrf(Q, tol=10 * Q.shape[0] * _EPS * scale_of(Q))
    if info < 0:
        raise ValueError(f"pivoted Cholesky rejected its argument (LAPACK dpstrf info={info})")
    R = np.zeros((rank, Q.shape[0]))
    R[:, piv - 1] = np.triu(factor[:rank])
    return R


def nnls_gram(Q: np.ndarray, q: np.ndarray, max_iter: int | None = None, start: np.ndarray | None = None) -> np.ndarray:
    """Solve ``min_{u ≥ 0} ½ uᵀQu + qᵀu`` for a symmetric PSD ``Q`` (Lawson–Hanson, Gram form).

    The objective must be bounded below on the orthant (true for every caller here). ``start``, a
    boolean mask, is a guess of the optimal support (e.g. the previous problem's, when solving a
    sequence of related problems), improved by block principal pivoting before Lawson–Hanson
    checks or finishes the result: a good guess ends the solve after one linear solve and the
    optimality check. Several problems with the same ``Q``
    share its preparation through :class:`LawsonHanson`.
    """
    return LawsonHanson(Q).solve(q, max_iter, start)


class LawsonHanson:
    """:func:`nnls_gram` for one ``Q`` and any number of linear terms ``q``."""

    def __init__(self, Q: np.ndarray, root: Callable[[], np.ndarray] | None = None) -> None:
        """``root``: a function returning a matrix ``R`` with ``RᵀR = Q`` (e.g. by :func:`psd_root`),
        called once, where first needed. With it (and more than two coordinates), where block
        principal pivoting fails or is bound to (``Q`` singular to working precision), problems
        start from SciPy's compiled NNLS on ``R`` (see :meth:`_compiled_guess`) instead of from
        zero. On singular ``Q`` the optimum's weights are not unique and SciPy's can be larger
        than Lawson–Hanson's (which adds coordinates only as needed): for callers that use the
        direction, not the weights' size."""
        self.Q = Q
        self._make_root, self._root = root, None
        # |Q| entrywise (per-entry rounding bounds) and its largest entry (the aggregate ones).
        self.abs_Q = np.abs(Q)
        self.Q_max = float(self.abs_Q.max(initial=0.0))
        # Jacobi scaling to a unit diagonal for every linear solve: gradients whose norms differ
        # by orders of magnitude make Q badly scaled (not nearly singular), and the solves would
        # otherwise lose the small ones' directions. The iterate stays in the original units.
        self.d = 1.0 / np.sqrt(np.maximum(Q.diagonal(), _TINY))
        self.Qs = Q * self.d[:, None] * self.d[None, :]
        # Block pivoting fails (meets singular blocks, or cycles) where Q is singular to working
        # precision: with a root to start from instead, it is not tried there.
        self._pivoting_failed = self._compiles and _singular(*lapack.dpotrf(self.Qs))

    def solve(self, q: np.ndarray, max_iter: int | None = None, start: np.ndarray | None = None,
              rhs: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
        """The optimum for the linear term ``q``. ``rhs``: with a ``root``, a function of ``R``
        returning a ``b`` with ``Rᵀb = −q``, the least-squares form of the problem, which the
        caller knows without a solve (e.g. ``b = −Ru`` for ``q = Qu``)."""
        Q, n = self.Q, q.shape[0]
        q_abs = float(np.abs(q).max(initial=0.0))
        u = np.zeros(n)
        if not -q.min(initial=0.0) > 10 * n * _EPS * q_abs:
            return u  # zero is optimal, as the loop below would find at once
        passive = np.zeros(n, dtype=bool)
        # Block principal pivoting fails on singular or ill-conditioned blocks, a property of Q:
        # after one failure (with a root: from the start where Q is singular) the problems on
        # this Q skip it (to the compiled guess where there is a root, else to Lawson–Hanson
        # from zero).
        guess = None
        if start is not None and start.any() and not self._pivoting_failed:
            guess = self._exchange(q, start, q_abs)
            self._pivoting_failed = guess is None
        if guess is not None and _decreases(Q, q, u, guess[0], -q, 10 * n * _EPS * q_abs):
            return guess[0]  # block pivoting checked the KKT conditions to the tolerance below
        if rhs is not None and self._compiles and (guess := self._compiled_guess(rhs(self.root()))) is not None:
            if self._optimal(q[None], guess[None])[0]:
                return guess
            return self._from_guess(q, guess, max_iter)
        return self._lawson_hanson(q, u, passive, max_iter)

    def solve_rows(self, qs: np.ndarray, starts: np.ndarray, rhs: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """:meth:`solve` for every row of ``qs``, with ``starts[i]`` and row ``i`` of ``rhs(R)``,
        sharing the NumPy calls across rows: rows whose optimum is zero are skipped, block
        pivoting's first swaps run for all rows at once (:meth:`_pivot_rows`), and once pivoting
        is off for this ``Q`` the remaining rows' compiled guesses are KKT-tested together."""
        out, B = np.zeros_like(qs), None

        def row_rhs(R: np.ndarray, i: int) -> np.ndarray:
            nonlocal B
            B = rhs(R) if B is None else B
            return B[i]

        # Rows whose optimum is zero (no entry of −q beyond rounding) need no solve.
        tol = 10 * qs.shape[1] * _EPS * np.abs(qs).max(axis=1, initial=0.0)
        todo = (-qs.min(axis=1, initial=0.0) > tol).nonzero()[0]
        if not self._pivoting_failed and todo.size > 2:
            # On a regular Gram a few batched swaps settle most rows (every row of the
            # benchmark's hard-conflict family); the others go on one by one. (For one or two
            # rows the batch's set-up costs more than it saves.)
            Z, done = self._pivot_rows(qs[todo], starts[todo])
            out[todo[done]] = Z[done]
            todo = todo[~done]
        guessed = []
        for i in todo:
            if not (self._pivoting_failed and self._compiles):
                out[i] = self.solve(qs[i], start=starts[i], rhs=lambda R, i=i: row_rhs(R, i))
            elif (guess := self._compiled_guess(row_rhs(self.root(), i))) is None:
                out[i] = self.solve(qs[i])
            else:
                out[i] = guess
                guessed.append(i)
        if not guessed:
            return out
        guessed = np.array(guessed)
        for i in guessed[~self._optimal(qs[guessed], out[guessed])]:
            out[i] = self._from_guess(qs[i], out[i])
        return out

    def _pivot_rows(self, qs: np.ndarray, starts: np.ndarray, rounds: int = 3) -> tuple[np.ndarray, np.ndarray]:
        """Block pivoting's first ``rounds`` swaps for every row at once (one batched
        factorisation of the Jacobi-scaled passive blocks, padded with the identity, per round).
        Returns the solutions and which rows they are the optimum of, by the tests :meth:`solve`
        applies to block pivoting's result (strict pivots, the KKT conditions, a decrease from
        zero beyond rounding); the other rows are left to :meth:`solve`."""
        k, n = qs.shape
        passive, Z = starts.copy(), np.zeros_like(qs)
        done = np.zeros(k, dtype=bool)
        abs_q = np.abs(qs)
        for _ in range(rounds):
            rows = (~done).nonzero()[0]
            P, q = passive[rows], qs[rows]
            A = np.where(P[:, :, None] & P[:, None, :], self.Qs, np.eye(n))
            try:
                pivots = np.linalg.cholesky(A).diagonal(axis1=1, axis2=2)
            except np.linalg.LinAlgError:  # a block is not positive definite: the rest one by one
                break
            regular = (pivots**2).min(axis=1) > 1e3 * P.sum(axis=1) * _EPS
            z = self.d * np.linalg.solve(A, np.where(P, -q * self.d, 0.0)[..., None])[..., 0]
            neg_grad = -(z @ self.Q + q)
            tol = (10 * n * _EPS * (abs_q[rows].max(axis=1) + self.Q_max * np.abs(z).sum(axis=1)))[:, None]
            wrong = np.where(P, z < 0, neg_grad > tol)
            # _decreases from u = 0: the change of the objective against its rounding bound.
            linear, quadratic = (z * q).sum(axis=1), 0.5 * ((z @ self.Q) * z).sum(axis=1)
            margin = 4 * _EPS * (np.abs(linear) + np.abs(quadratic))
            decreases = linear + quadratic < -((np.abs(z) * (10 * n * _EPS * abs_q[rows])).sum(axis=1) + margin)
            ok = regular & ~wrong.any(axis=1) & (np.where(P, np.abs(neg_grad), 0.0) <= tol).all(axis=1) & decreases
            Z[rows[ok]], done[rows[ok]] = z[ok], True
            if done.all():
                break
            passive[rows] ^= wrong  # swap every coordinate that breaks optimality
        return Z, done

    @property
    def _compiles(self) -> bool:
        return self._make_root is not None and self.Q.shape[0] > 2

    def root(self) -> np.ndarray:
        """The root ``R`` (``RᵀR = Q``) given as a function to the constructor, made once."""
        if self._root is None:
            self._root = self._make_root()
        return self._root

    def _from_guess(self, q: np.ndarray, guess: np.ndarray, max_iter: int | None = None) -> np.ndarray:
        """Lawson–Hanson from a guess that failed the KKT test: its invariant (``u`` optimal on
        its support) is restored first, from the guess rather than from zero."""
        u, passive = self._descend(q, guess, guess > 0)
        return self._lawson_hanson(q, u, passive, max_iter)

    def _lawson_hanson(self, q: np.ndarray, u: np.ndarray, passive: np.ndarray, max_iter: int | None) -> np.ndarray:
        """Lawson–Hanson's outer loop from ``u``, optimal on its support ``passive``."""
        Q, n = self.Q, q.shape[0]
        max_iter = max_iter if max_iter is not None else 10 * n + 20
        q_abs = float(np.abs(q).max(initial=0.0))
        # Coordinates whose addition the last try rejected: in exact arithmetic adding a
        # coordinate with a positive negative-gradient always lowers the objective; in floating
        # point a rounding-level gradient may not, and retrying it would cycle. Cleared whenever
        # u moves.
        blocked = np.zeros(n, dtype=bool)
        minus_q = -q
        for _ in range(max_iter):
            neg_grad = minus_q - Q @ u
            # A gradient within a few ulps of the terms it is computed from is zero.
            tol = 10 * n * _EPS * (q_abs + self.Q_max * float(u.sum()))
            pick = np.where(passive | blocked, -np.inf, neg_grad)
            j = int(pick.argmax())
            if not pick[j] > tol:
                return u
            trial = passive.copy()
            trial[j] = True
            new_u, new_passive = self._descend(q, u, trial)
            if new_u[j] <= 0 or not _decreases(Q, q, u, new_u, neg_grad, tol):
                blocked[j] = True
                continue
            u, passive = new_u, new_passive
            blocked[:] = False
        raise RuntimeError(f"Lawson–Hanson NNLS did not converge in {max_iter} iterations (n={n})")

    def _optimal(self, qs: np.ndarray, us: np.ndarray) -> np.ndarray:
        """Per row, the KKT conditions at ``u ≥ 0`` for the linear term ``q``: a zero gradient on
        the support, a non-negative one elsewhere, each entry to its own rounding bound (never
        looser than the tolerance :meth:`solve` stops at)."""
        neg_grad = -(us @ self.Q + qs)
        violation = np.where(us > 0, np.abs(neg_grad), neg_grad)
        # Each entry's own rounding bound, so that a large weight elsewhere cannot widen it.
        return (violation <= 10 * qs.shape[-1] * _EPS * (np.abs(qs) + us @ self.abs_Q)).all(axis=-1)

    def _compiled_guess(self, b: np.ndarray) -> np.ndarray | None:
        """SciPy's compiled Lawson–Hanson on the root, ``min_{u ≥ 0} ‖Ru − b‖²``: where the
        passive blocks are singular or ill-conditioned, block principal pivoting fails and
        Lawson–Hanson adds one coordinate per NumPy-bound iteration, ~20 µs each; SciPy's loop
        costs ~1 µs. Its answer is accepted only where it meets the KKT conditions on ``Q`` itself
        to the tolerance Lawson–Hanson stops at (always, in the benchmark's degenerate families, by
        a factor of 100); otherwise Lawson–Hanson descends from it, so the result is this method's
        exact optimum either way. None where SciPy hit its iteration limit."""
        try:
            u = optimize.nnls(self.root(), b, maxiter=20 * self.Q.shape[0])[0]
        except RuntimeError:
            return None
        # A zero column (a zero gradient) leaves its coordinate free in SciPy's problem, and it
        # may come back huge; its optimum is 0 (its linear term is ≥ 0, or nothing is bounded).
        u[self.Q.diagonal() <= 0] = 0.0
        return u

    def _exchange(self, q: np.ndarray, passive: np.ndarray, q_abs: float) -> tuple[np.ndarray, np.ndarray] | None:
        """Block principal pivoting (Júdice & Pires 1994; Kim & Park 2011) from the guessed
        support: solve on the passive set, then swap every coordinate that breaks optimality (a
        negative passive value, a positive negative-gradient elsewhere) at once, and after three
        swaps that do not lower their number only the last of them, which terminates for positive
        definite ``Q`` (here capped at five solves: on the benchmark's well-conditioned families it
        succeeds within five, and solves past five were mostly spent cycling on ill-conditioned
        ones). Usually a few solves where Lawson–Hanson adds coordinates one at a time.
        Returns the optimum, checked to the tolerances of :meth:`solve`, or None (a singular block,
        no convergence, a check failed) to let Lawson–Hanson start from zero."""
        Q, n = self.Q, q.shape[0]
        passive = passive.copy()
        fewest, chances = n + 1, 3
        for _ in range(5):  # it converges in a few swaps or, on ill-conditioned Q, tends to cycle
            try:
                z = self._solve_on(q, passive, strict=True)
            except np.linalg.LinAlgError:
                return None
            neg_grad = -(Q @ z + q)
            tol = 10 * n * _EPS * (q_abs + self.Q_max * float(np.abs(z).sum()))
            wrong = np.where(passive, z < 0, neg_grad > tol)
            count = int(wrong.sum())
            if count == 0:
                # Strict solves accept any positive pivot: check that z is the optimum of its support.
                return (z, passive & (z > 0)) if np.abs(neg_grad[passive]).max(initial=0.0) <= tol else None
            if count < fewest:
                fewest, chances = count, 3
            elif chances > 0:
                chances -= 1
            else:
                wrong[: wrong.nonzero()[0][-1]] = False
            passive ^= wrong
        return None

    def _descend(self, q: np.ndarray, u: np.ndarray, passive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Lawson–Hanson inner loop: from a feasible ``u``, step towards the unconstrained optimum
        of the passive set (updated in place) until the first passive coordinate hits zero, drop
        it, re-solve; it ends at the optimum of a passive set with all coordinates positive."""
        z = self._solve_on(q, passive)
        while not (z[passive] > 0).all():
            idx = np.flatnonzero(passive & (z <= 0))
            gap = u[idx] - z[idx]
            steps = np.divide(u[idx], gap, out=np.zeros_like(gap), where=gap > 0)  # u = z = 0: drop at once
            alpha = float(steps.min())
            u = u + alpha * (z - u)
            passive[idx[steps <= alpha]] = False
            passive &= u > 0
            u[~passive] = 0.0
            z = self._solve_on(q, passive)
        return z, passive

    def _solve_on(self, q: np.ndarray, passive: np.ndarray, strict: bool = False) -> np.ndarray:
        """Unconstrained minimiser over the passive coordinates (others zero). ``strict``: raise
        ``LinAlgError`` where Cholesky fails instead of solving by least squares, and accept any
        positive pivot (the caller then checks the result)."""
        z = np.zeros(self.d.shape[0])
        idx = passive.nonzero()[0]
        if idx.size:
            A, b = self.Qs[idx[:, None], idx], -q[idx] * self.d[idx]
            # Cholesky (LAPACK dposv) while the passive block is numerically positive definite:
            # a pivot below n·eps of the unit diagonal means it is singular to working precision
            # (e.g. affinely dependent gradients), where the least-norm solution of lstsq is the
            # one the method needs.
            factor, x, info = lapack.dposv(A, b)
            singular = _singular(factor, info)
            if singular and strict:
                raise np.linalg.LinAlgError("singular passive block")
            if singular:
                x = np.linalg.lstsq(A, b, rcond=None)[0]
            z[idx] = self.d[idx] * x
        return z


def _singular(factor: np.ndarray, info: int) -> bool:
    """Whether LAPACK's Cholesky of a unit-diagonal matrix failed or met a pivot below ``k·eps``
    of the diagonal (``k`` its order): singular to working precision."""
    return info != 0 or factor.diagonal().min() ** 2 <= 1e3 * factor.shape[0] * _EPS


def _decreases(Q: np.ndarray, q: np.ndarray, old: np.ndarray, new: np.ndarray, neg_grad: np.ndarray, tol: float) -> bool:
    """Whether ``new`` lowers the objective by more than rounding error.

    The change is computed from the step itself, ``Δᵀ(Q·old + q) + ½ ΔᵀQΔ``, not as a difference of
    two objective values, so that small but real improvements are not lost in the objective's
    own rounding (the MGDA reduction adds a constant-sized ``(1ᵀu − 1)²`` term). ``neg_grad`` is
    ``−(Q·old + q)`` and ``tol`` the caller's bound ``10·n·eps·(max|q| + max|Q|·Σ old)``.
    """
    step = new - old
    linear, quadratic = -float(step @ neg_grad), 0.5 * float(step @ Q @ step)
    margin = 4 * _EPS * (abs(linear) + abs(quadratic))
    # tol bounds every entry of the rounding bound below (old ≥ 0), so a decrease beyond
    # tol·‖Δ‖₁ is real without computing it; the exact bound decides the close calls.
    if linear + quadratic < -(tol * float(np.abs(step).sum()) + margin):
        return True
    # Rounding bound of each gradient entry, weighted by how far that coordinate moves.
    grad_noise = 10 * q.shape[0] * _EPS * (np.abs(Q) @ np.abs(old) + np.abs(q))
    return linear + quadratic < -(float(np.abs(step) @ grad_noise) + margin)


def min_norm_weights(gram: np.ndarray, start: np.ndarray | None = None) -> np.ndarray:
    """Weights ``w`` on the simplex minimising ``wᵀ gram w`` (the MGDA min-norm problem).

    The min-norm point ``Jᵀw`` is unique; ``w`` is unique only when the gradients of its support
    are affinely independent, otherwise one optimal ``w`` is returned. ``start`` (a boolean mask)
    guesses the support, see :func:`nnls_gram`.
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
    # Without a guess, start from every task: where the min-norm point is interior (the usual case
    # for T ≪ the gradients' dimension) that is the answer in one solve.
    # In least-squares form the reduction is min_{u ≥ 0} ‖[R; 1ᵀ]u − e_last‖² for a root RᵀR = G.
    nnls = LawsonHanson(G + 1.0, root=lambda: np.vstack([psd_root(G), np.ones(T)]))
    u = nnls.solve(-np.ones(T), start=np.ones(T, dtype=bool) if start is None else start, rhs=_last_unit_vector)
    total = u.sum()
    if total <= 0:
        raise RuntimeError("min-norm NNLS returned the zero vector; the Gram matrix is not PSD")
    return u / total


def _last_unit_vector(R: np.ndarray) -> np.ndarray:
    e = np.zeros(R.shape[0])
    e[-1] = 1.0
    return e


def _min_norm_two(G: np.ndarray) -> np.ndarray:
    """Closed form for T = 2: the minimiser of ‖γ g1 + (1−γ) g2‖² clipped to [0, 1]."""
    denom = G[0, 0] + G[1, 1] - 2 * G[0, 1]
    if denom <= 0:  # identical gradients: every point of the segment is the same vector
        return np.array([0.5, 0.5])
    gamma = float(np.clip((G[1, 1] - G[0, 1]) / denom, 0.0, 1.0))
    return np.array([gamma, 1.0 - gamma])
