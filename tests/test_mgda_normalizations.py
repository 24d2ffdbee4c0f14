"""MGDA's normalizations as Sener & Koltun's code defines them (``gradient_normalizers``: none, l2, loss,
loss+), with the weights applied to the normalized gradients or, as their training loop does, to the
raw ones: against their procedure written on the gradient vectors, with SciPy's NNLS as the
min-norm solver."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import nnls
from test_solver_reference import CASES, random_jacobian

from lightning_moo.solvers import EMA, MGDA

NORMALIZATIONS = ["none", "l2", "loss", "loss+"]


def min_norm_weights_reference(P: np.ndarray) -> np.ndarray:
    """Simplex weights of the min-norm point of the rows of P (NNLS on [Pᵀ; 1ᵀ] u ≈ [0; 1])."""
    u, _ = nnls(np.vstack([P.T, np.ones(P.shape[0])]), np.r_[np.zeros(P.shape[1]), 1.0])
    return u / u.sum()


def sener_koltun(J: np.ndarray, losses: np.ndarray, normalization: str, apply_to: str) -> np.ndarray:
    """Their train_multi_task.py: divide each task's gradient by gn[t], solve the min-norm problem on
    them, then scale the raw losses by the solution (``raw``) — or apply it to the normalized ones."""
    norms = np.linalg.norm(J, axis=1)
    gn = {"none": np.ones(len(J)), "l2": norms, "loss": losses, "loss+": losses * norms}[normalization]
    P = J / gn[:, None]
    sol = min_norm_weights_reference(P)
    return sol @ (J if apply_to == "raw" else P)


def losses_for(T: int, seed: int) -> np.ndarray:
    return np.random.default_rng(100 + seed).uniform(0.5, 4.0, size=T)


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("apply_to", ["normalized", "raw"])
@pytest.mark.parametrize("T, seed", CASES)
def test_equals_sener_koltuns_procedure_on_the_vectors(normalization, apply_to, T, seed):
    J, losses = random_jacobian(T, seed), losses_for(T, seed)
    w = MGDA(normalization, apply_to)(torch.from_numpy(J @ J.T), losses=torch.from_numpy(losses)).numpy()
    ref = sener_koltun(J, losses, normalization, apply_to)
    np.testing.assert_allclose(w @ J, ref, rtol=0, atol=1e-8 * np.linalg.norm(J, axis=1).max())


def test_declared_conflict_freeness_holds_and_raw_loss_plus_does_conflict():
    conflicted = 0
    for seed in range(200):
        T = 2 + seed % 6
        J, losses = random_jacobian(T, seed), losses_for(T, seed)
        for normalization in NORMALIZATIONS:
            for apply_to in ("normalized", "raw"):
                solver = MGDA(normalization, apply_to)
                d = solver(torch.from_numpy(J @ J.T), losses=torch.from_numpy(losses)).numpy() @ J
                worst = (J @ d).min()
                if solver.conflict_free:
                    assert worst >= -1e-9 * np.abs(J @ J.T).max(), (normalization, apply_to, seed)
                elif normalization == "loss+":
                    conflicted += int(worst < 0)
    # The raw application is declared conflict-prone because it is: some instances conflict.
    assert conflicted > 0


def test_declarations_and_losses():
    assert [MGDA(n).needs_losses for n in NORMALIZATIONS] == [False, False, True, True]
    assert [MGDA(n).scale_invariant for n in NORMALIZATIONS] == [True, False, True, False]
    assert MGDA("loss+", "raw").conflict_free is False and MGDA("none", "raw").conflict_free is True
    assert EMA(MGDA("loss+")).needs_losses  # the strategies then gather the losses for the inner solver
    # Loss normalization: scaling the gradients (losses kept) scales d; loss+ and l2 divide it out.
    J, losses = random_jacobian(4, 0), torch.from_numpy(losses_for(4, 0))
    G = torch.from_numpy(J @ J.T)
    for normalization, power in (("loss", 1), ("loss+", 0), ("l2", 0)):
        w1 = MGDA(normalization)(G, losses=losses).numpy()
        w3 = MGDA(normalization)(9 * G, losses=losses).numpy()
        np.testing.assert_allclose((w3 @ (3 * J)), 3**power * (w1 @ J), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kwargs, losses, message", [
    (dict(normalization="loss"), None, "needs each language's loss"),
    (dict(normalization="loss+"), [1.0, 0.0, 2.0], "must be positive"),
    (dict(normalization="L2"), [1.0, 1.0, 1.0], "normalization must be one of none, l2, loss, loss\\+"),
    (dict(apply_to="both"), [1.0, 1.0, 1.0], "apply_to must be 'normalized' or 'raw'"),
])
def test_bad_use_fails_with_the_fix(kwargs, losses, message):
    J = random_jacobian(3, 0)
    with pytest.raises(ValueError, match=message):
        MGDA(**kwargs)(torch.from_numpy(J @ J.T), losses=None if losses is None else torch.tensor(losses))
