"""Hypothesis strategies for task-gradient matrices J (T×n), random and degenerate."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

# Zero or magnitudes in [1e-6, 10]: gradient entries whose squares underflow would make Gram
# matrices that violate Cauchy–Schwarz, which no real gradient produces.
entries = st.one_of(st.just(0.0), st.floats(1e-6, 10), st.floats(-10, -1e-6))


@st.composite
def jacobians(draw, min_tasks: int = 1, max_tasks: int = 8, max_dim: int = 10, scales: bool = True,
              well_posed: bool = False, spread: int = 0) -> np.ndarray:
    """A T×n gradient matrix, then a few degenerate edits: duplicated, negated, zeroed and
    rescaled rows (ill-conditioning), and an overall scale so Gram entries span 1e-30..1e30.

    ``well_posed``: small integer entries and no near-dependent rows, so that every cancellation
    in the Gram matrix is exact (for checks to 1e-7 that a Gram matrix cannot support when two
    gradients are within 1e-7 of parallel: their difference then has fewer digits than that).
    ``spread`` additionally scales each row by 10^k, k in [-spread, spread]."""
    T = draw(st.integers(min_tasks, max_tasks))
    n = draw(st.integers(1, max_dim))
    if well_posed:
        J = draw(arrays(np.float64, (T, n), elements=st.integers(-5, 5).map(float)))
        if spread:
            J *= 10.0 ** np.array(draw(st.lists(st.integers(-spread, spread), min_size=T, max_size=T)))[:, None]
        return J
    J = draw(arrays(np.float64, (T, n), elements=entries))
    for _ in range(draw(st.integers(0, 3))):
        i, j = draw(st.integers(0, T - 1)), draw(st.integers(0, T - 1))
        edit = draw(st.sampled_from(["duplicate", "negate", "zero", "rescale", "mix"]))
        if edit == "duplicate":
            J[i] = J[j]
        elif edit == "negate":
            J[i] = -J[j]
        elif edit == "zero":
            J[i] = 0
        elif edit == "rescale":
            J[i] *= 10.0 ** draw(st.integers(-4, 4))
        else:  # a nearly dependent row
            J[i] = J[j] + 1e-7 * J[i]
    if scales:
        J *= 10.0 ** draw(st.integers(-15, 15))
    return J


def nonzero(J: np.ndarray) -> bool:
    return bool(np.any(J))
