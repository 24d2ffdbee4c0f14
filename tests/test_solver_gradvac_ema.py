"""GradVac and EMA (CR-MOGM): against the papers' recursions on explicit gradients, over several
steps and buckets with their state carried, and through checkpoints (state_dict round trips)."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
import yaml
from hypothesis import assume, given
from hypothesis import strategies as st
from jsonargparse import ArgumentParser
from torch.testing import assert_close

from lightning_moo.solvers import (
    EMA, MGDA, BUILTIN, CAGrad, GradVac, MOOSolver, NashMTL, PCGrad, UPGrad, get_solver, solver_class,
)

from jacobians import jacobians


def random_jacobian(T: int, rng: np.random.Generator, n: int = 12) -> np.ndarray:
    """Gradients sharing a common component (positive cosines, so targets rise above 0) plus noise
    strong enough to make some pairs conflict."""
    return 0.6 * rng.normal(size=n) + rng.normal(size=(T, n)) * rng.uniform(0.3, 2.0, size=(T, 1))


def gram(J: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(J @ J.T)


def checkpointed(solver: MOOSolver) -> dict:
    """The solver's state as a checkpoint stores it: through torch.save / torch.load."""
    buffer = io.BytesIO()
    torch.save(solver.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


# --- GradVac --------------------------------------------------------------------------------------

def gradvac_reference(J: np.ndarray, orders: list[list[int]], phi_hat: np.ndarray, beta: float):
    """Wang et al.'s update on the gradient vectors, written from the paper: for each task i and
    each other task j in the given order, φ = cos(g_i', g_j); if φ < φ̂_ij, add the multiple of
    g_j that makes the cosine φ̂_ij (Eq. 3); then φ̂_ij ← (1−β)φ̂_ij + βφ. Returns the sum of the
    vaccinated gradients, the new targets and how many vaccinations had a non-zero target."""
    phi_hat = phi_hat.copy()
    vaccinated, nonzero_targets = [], 0
    for i, order in enumerate(orders):
        g = J[i].copy()
        for j in order:
            phi = g @ J[j] / (np.linalg.norm(g) * np.linalg.norm(J[j]))
            target = phi_hat[i, j]
            if phi < target:
                g = g + (np.linalg.norm(g) * (target * np.sqrt(1 - phi**2) - phi * np.sqrt(1 - target**2))
                         / (np.linalg.norm(J[j]) * np.sqrt(1 - target**2))) * J[j]
                nonzero_targets += target != 0
                assert np.isclose(g @ J[j] / (np.linalg.norm(g) * np.linalg.norm(J[j])), target, atol=1e-12)
            phi_hat[i, j] = (1 - beta) * target + beta * phi
        vaccinated.append(g)
    return np.sum(vaccinated, axis=0), phi_hat, nonzero_targets


@pytest.mark.parametrize("T", [2, 3, 5])
@pytest.mark.parametrize("beta", [0.01, 0.3])
def test_gradvac_matches_the_paper_over_steps_and_buckets(T, beta):
    """Twelve steps over two buckets (interleaved, each with its own targets), new gradients every
    step; the reference takes only the order of the pairs from the solver."""
    rng = np.random.default_rng(T * 100 + int(beta * 100))
    solver = GradVac(beta=beta, seed=7)
    targets = {"enc.0": np.zeros((T, T)), 3: np.zeros((T, T))}
    moved = with_targets = 0
    for step in range(6):
        for bucket in targets:
            J = random_jacobian(T, rng)
            d = solver(gram(J), bucket=bucket, step=step).numpy() @ J
            orders = solver.orders(T)
            assert all(sorted(order) == [j for j in range(T) if j != i] for i, order in enumerate(orders))
            ref, targets[bucket], count = gradvac_reference(J, orders, targets[bucket], beta)
            with_targets += count
            np.testing.assert_allclose(d, ref, rtol=0, atol=1e-10 * np.abs(J).max())
            np.testing.assert_allclose(np.array(solver.state_dict()["buckets"][bucket]["phi_hat"]), targets[bucket],
                                       rtol=0, atol=1e-12)
            moved += np.count_nonzero(targets[bucket])
    assert moved > 0 and with_targets > 0  # vaccinations beyond PCGrad's happened


def test_gradvac_vaccinates_towards_positive_targets():
    """A target above 0 vaccinates a pair that does not conflict, which PCGrad leaves alone: two
    gradients at cosine 0.1 with a target of 0.5 end at cosine 0.5 each."""
    J = np.array([[1.0, 0.0], [0.1, np.sqrt(0.99)]])
    solver = GradVac(beta=0.5)
    solver.load_state_dict({"buckets": {0: {"phi_hat": [[0.0, 0.5], [0.5, 0.0]]}}})
    d = solver(gram(J)).numpy() @ J
    ref, new_targets, _ = gradvac_reference(J, solver.orders(2), np.array([[0.0, 0.5], [0.5, 0.0]]), 0.5)
    np.testing.assert_allclose(d, ref, atol=1e-14)
    assert not np.allclose(d, PCGrad()(gram(J)).numpy() @ J)
    np.testing.assert_allclose(new_targets, [[0, 0.3], [0.3, 0]], atol=1e-14)  # 0.5·0.5 + 0.5·0.1


@pytest.mark.parametrize("T", [2, 3, 4, 6])
@pytest.mark.parametrize("seed", range(3))
def test_gradvac_first_step_is_pcgrad(T, seed):
    """With every target 0, a vaccination is PCGrad's projection; the orders are PCGrad's too."""
    J = random_jacobian(T, np.random.default_rng(seed))
    assert_close(GradVac(seed=seed)(gram(J), bucket="b", step=4), PCGrad(seed=seed)(gram(J), bucket="b", step=4),
                 rtol=1e-12, atol=1e-12)


def test_gradvac_with_beta_zero_is_pcgrad_at_every_step():
    rng = np.random.default_rng(0)
    solver = GradVac(beta=0.0, seed=2)
    for step in range(5):
        J = random_jacobian(4, rng)
        assert_close(solver(gram(J), step=step), PCGrad(seed=2)(gram(J), step=step), rtol=1e-12, atol=1e-12)


def test_gradvac_two_opposed_gradients_cancel_and_zero_gradients_keep_their_targets():
    solver = GradVac(beta=0.5)
    J = np.array([[1.0, 2.0], [-1.0, -2.0], [0.0, 0.0]])
    w = solver(gram(J)).numpy()
    assert np.linalg.norm(w @ J) < 1e-12
    phi_hat = np.array(solver.state_dict()["buckets"][0]["phi_hat"])
    assert phi_hat[2].tolist() == [0, 0, 0] and phi_hat[:, 2].tolist() == [0, 0, 0]  # no cosine with a zero gradient


def test_gradvac_resumes_from_a_checkpoint():
    """Steps 0–2, a checkpoint, a new solver loading it, steps 3–5: the weights of the straight run."""
    rng = np.random.default_rng(5)
    grams = [(gram(random_jacobian(4, rng)), bucket, step) for step in range(6) for bucket in (0, "head")]
    straight = GradVac(beta=0.2, seed=1)
    expected = [straight(G, bucket=b, step=s) for G, b, s in grams]
    first = GradVac(beta=0.2, seed=1)
    got = [first(G, bucket=b, step=s) for G, b, s in grams[:6]]
    snapshot = first.state_dict()
    frozen = copy.deepcopy(snapshot)
    resumed = GradVac(beta=0.2, seed=1)
    resumed.load_state_dict(checkpointed(first))
    first(grams[6][0], bucket=grams[6][1], step=grams[6][2])
    assert snapshot == frozen  # a state_dict is a snapshot: later steps do not change it
    got += [resumed(G, bucket=b, step=s) for G, b, s in grams[6:]]
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    # Without the targets the resumed run differs: the state matters.
    fresh = GradVac(beta=0.2, seed=1)
    assert not all(torch.equal(fresh(G, bucket=b, step=s), e) for (G, b, s), e in zip(grams[6:], expected[6:]))


def test_gradvac_is_scale_invariant_over_a_sequence():
    """Scaling every gradient of every step by a > 0 gives the same weights at every step."""
    rng = np.random.default_rng(9)
    grams = [gram(random_jacobian(4, rng)) for _ in range(8)]
    plain, scaled = GradVac(beta=0.3), GradVac(beta=0.3)
    for step, G in enumerate(grams):
        assert_close(plain(G, step=step), scaled(G * 1e-12, step=step), rtol=1e-9, atol=1e-12)


def test_gradvac_restarts_a_bucket_whose_number_of_tasks_changes():
    rng = np.random.default_rng(1)
    solver = GradVac(beta=0.5)
    solver(gram(random_jacobian(3, rng)))
    G = gram(random_jacobian(4, rng))
    assert_close(solver(G, step=1), PCGrad()(G, step=1), rtol=1e-12, atol=1e-12)


def test_gradvac_arguments():
    assert GradVac().beta == 0.01 and GradVac().declarations() == {
        "conflict_free": False, "scale_invariant": True, "permutation_equivariant": False, "stateful": True}
    with pytest.raises(ValueError, match="beta"):
        GradVac(beta=1.5)
    assert isinstance(get_solver("GradVac", beta=0.1), GradVac) and solver_class("gradvac") is GradVac


# --- EMA --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("inner", [MGDA, lambda: CAGrad(c=0.4), lambda: PCGrad(seed=3)])
def test_ema_matches_the_recursion_over_steps_and_buckets(inner):
    """w_s = β w_{s−1} + (1 − β) inner(G_s), per bucket, first step the inner weights."""
    rng = np.random.default_rng(0)
    beta = 0.7
    solver, reference = EMA(inner(), beta=beta), inner()
    smoothed: dict = {}
    for step in range(5):
        for bucket in ("a", 1, "b"):
            G = gram(random_jacobian(4, rng))
            fresh = reference(G, bucket=bucket, step=step).numpy()
            smoothed[bucket] = fresh if bucket not in smoothed else beta * smoothed[bucket] + (1 - beta) * fresh
            np.testing.assert_allclose(solver(G, bucket=bucket, step=step).numpy(), smoothed[bucket], rtol=1e-12,
                                       atol=1e-14)


def test_ema_resumes_from_a_checkpoint_with_the_inner_solvers_state():
    """Nash-MTL recomputing every second step keeps its last weights in its own state: a resumed EMA
    must restore both averages and the inner solver's weights to continue the straight run."""
    rng = np.random.default_rng(3)
    grams = [(gram(random_jacobian(3, rng)), bucket, step) for step in range(7) for bucket in (0, "x")]
    make = lambda: EMA(NashMTL(update_weights_every=2), beta=0.5)  # noqa: E731
    straight = make()
    expected = [straight(G, bucket=b, step=s) for G, b, s in grams]
    first = make()
    for G, b, s in grams[:6]:
        first(G, bucket=b, step=s)
    state = checkpointed(first)
    assert state["solver"]["buckets"] and state["buckets"]  # both levels saved
    resumed = make()
    resumed.load_state_dict(state)
    for (G, b, s), e in zip(grams[6:], expected[6:]):
        assert torch.equal(resumed(G, bucket=b, step=s), e)
    # Dropping the inner solver's state changes the resumed weights (step 3 reuses step 2's).
    partial = make()
    partial.load_state_dict({"buckets": state["buckets"]})
    assert not all(torch.equal(partial(G, bucket=b, step=s), e) for (G, b, s), e in zip(grams[6:], expected[6:]))


def test_ema_first_step_zero_grams_and_changed_task_counts():
    rng = np.random.default_rng(4)
    G = gram(random_jacobian(3, rng))
    assert_close(EMA()(G), MGDA()(G))
    solver = EMA(beta=0.5)
    solver(G)
    zeros = torch.zeros(3, 3, dtype=torch.float64)
    assert_close(solver(zeros, step=1), MGDA().neutral_weights(3))
    assert solver.state_dict()["buckets"][0]["weights"] == MGDA()(G).tolist()  # the average did not move
    G4 = gram(random_jacobian(4, rng))
    assert_close(solver(G4, step=2), MGDA()(G4))  # four tasks now: start again


def test_ema_declarations_follow_the_inner_solver():
    assert EMA().declarations() == {"conflict_free": False, "scale_invariant": True,
                                    "permutation_equivariant": True, "stateful": True}
    assert EMA.scale_invariant and EMA.permutation_equivariant and not EMA.conflict_free
    assert not EMA(MGDA("l2")).scale_invariant
    assert not EMA(UPGrad(pref=[1.0, 2.0])).permutation_equivariant
    assert not EMA(GradVac()).permutation_equivariant and EMA(GradVac()).scale_invariant
    assert EMA(beta=0.0).conflict_free and not EMA(PCGrad(), beta=0.0).conflict_free
    assert isinstance(EMA("cagrad").solver, CAGrad) and isinstance(EMA(None).solver, MGDA)
    with pytest.raises(ValueError, match="beta"):
        EMA(beta=1.0)
    with pytest.raises(ValueError, match="unknown solver"):
        EMA("nosuch")
    assert repr(EMA(CAGrad(c=0.3), beta=0.5)) == "EMA(solver=CAGrad(c=0.3, rescale=1), beta=0.5)"


def test_ema_from_yaml():
    """As LightningCLI builds it: jsonargparse, a nested class_path for the inner solver."""
    parser = ArgumentParser()
    parser.add_subclass_arguments(MOOSolver, "solver")
    config = yaml.safe_load("""
solver:
  class_path: lightning_moo.solvers.EMA
  init_args:
    solver: {class_path: lightning_moo.solvers.MGDA}
    beta: 0.9
""")
    solver = parser.instantiate(parser.parse_object(config)).solver
    assert isinstance(solver, EMA) and isinstance(solver.solver, MGDA) and solver.beta == 0.9
    config = yaml.safe_load("""
solver:
  class_path: lightning_moo.solvers.EMA
  init_args: {solver: {class_path: lightning_moo.solvers.CAGrad, init_args: {c: 0.2}}, beta: 0.5}
""")
    solver = parser.instantiate(parser.parse_object(config)).solver
    assert isinstance(solver.solver, CAGrad) and solver.solver.c == 0.2 and solver.beta == 0.5
    config = yaml.safe_load("solver: {class_path: lightning_moo.solvers.GradVac, init_args: {beta: 0.5, seed: 3}}")
    solver = parser.instantiate(parser.parse_object(config)).solver
    assert isinstance(solver, GradVac) and solver.beta == 0.5 and solver.seed == 3


@pytest.mark.timeout(60)
def test_ema_in_the_strategy_from_yaml():
    """The whole strategy block, as tests/distributed/test_strategy_config.py parses it (no processes)."""
    from lightning.pytorch.strategies import Strategy

    from lightning_moo.strategies import BucketMOOStrategy

    parser = ArgumentParser()
    parser.add_subclass_arguments(Strategy, "strategy")
    config = yaml.safe_load("""
strategy:
  class_path: lightning_moo.strategies.BucketMOOStrategy
  init_args:
    solver:
      class_path: lightning_moo.solvers.EMA
      init_args:
        solver: {class_path: lightning_moo.solvers.NashMTL, init_args: {update_weights_every: 2}}
        beta: 0.8
""")
    strategy = parser.instantiate(parser.parse_object(config)).strategy
    assert isinstance(strategy, BucketMOOStrategy) and isinstance(strategy.solver, EMA)
    assert isinstance(strategy.solver.solver, NashMTL) and strategy.solver.solver.update_weights_every == 2
    assert strategy.solver.beta == 0.8


def test_both_are_builtin():
    assert GradVac in BUILTIN and EMA in BUILTIN
    assert solver_class("ema") is EMA and solver_class("gradvac") is GradVac


# --- declared properties over sequences of steps (the property tests see first steps only) ------

SEQUENCES = {
    "gradvac": lambda: GradVac(beta=0.5, seed=1),
    "ema-mgda": lambda: EMA(MGDA(), beta=0.6),
    "ema-gradvac": lambda: EMA(GradVac(beta=0.5), beta=0.6),
    "ema-upgrad": lambda: EMA(UPGrad(), beta=0.6),
}


def same_direction(G: np.ndarray, w1: np.ndarray, w2: np.ndarray, rtol: float) -> bool:
    """Jᵀw1 == Jᵀw2, measured as in tests/test_solver_properties.py."""
    delta = w1 - w2
    scale = np.max(np.diag(G)) * max(np.abs(w1).sum(), np.abs(w2).sum(), 1.0) ** 2
    return float(delta @ G @ delta) <= rtol * scale


def gram_sequence(data, independent: bool) -> list[np.ndarray]:
    """2–4 Grams of the same T tasks. ``independent``: linearly independent, well-posed gradients,
    where every solver's weights are unique (not only its direction), so that an average of
    weights carried to the next step's gradients is determined; otherwise the degenerate draws of
    tests/jacobians.py (duplicated, opposed, zero, nearly dependent gradients)."""
    T = data.draw(st.integers(1, 4 if independent else 6))
    grams = []
    for _ in range(data.draw(st.integers(2, 4))):
        J = data.draw(jacobians(min_tasks=T, max_tasks=T, scales=False, well_posed=independent))
        assume(not independent or np.linalg.matrix_rank(J) == T)
        grams.append(J @ J.T)
    return grams


@pytest.mark.parametrize("make", [pytest.param(make, id=name) for name, make in SEQUENCES.items()])
@given(data=st.data(), exponent=st.integers(-20, 20))
def test_scale_invariance_over_steps(make, data, exponent):
    """Every step's Gram scaled by the same 10^k: the same directions at every step, state included.
    GradVac's coefficients are unique, so degenerate gradients too; the EMA of weights needs weights
    that are unique (see EMA's docstring)."""
    solver = make()
    assert solver.scale_invariant
    grams = gram_sequence(data, independent=isinstance(solver, EMA))
    plain, scaled = make(), make()
    for step, G in enumerate(grams):
        w = plain(torch.from_numpy(G), step=step).numpy()
        w_scaled = scaled(torch.from_numpy(G * 10.0**exponent), step=step).numpy()
        assert np.isfinite(w).all() and same_direction(G, w, w_scaled, 1e-9)


EQUIVARIANT = [pytest.param(make, id=name) for name, make in SEQUENCES.items() if make().permutation_equivariant]


@pytest.mark.parametrize("make", EQUIVARIANT)
@given(data=st.data())
def test_permutation_equivariance_over_steps(make, data):
    """The tasks permuted the same way at every step: every step's weights permuted."""
    grams = gram_sequence(data, independent=True)
    T = grams[0].shape[0]
    perm = np.array(data.draw(st.permutations(range(T))))
    plain, permuted = make(), make()
    for step, G in enumerate(grams):
        Gp = G[np.ix_(perm, perm)]
        w = plain(torch.from_numpy(G), step=step).numpy()
        w_perm = permuted(torch.from_numpy(Gp), step=step).numpy()
        assert same_direction(Gp, w[perm], w_perm, 1e-9)


@pytest.mark.parametrize("make", EQUIVARIANT)
@given(data=st.data())
def test_ema_step_is_equivariant_given_the_permuted_average(make, data):
    """On degenerate gradients too, one step is equivariant given the same, permuted, stored
    average (the declaration as one call sees it)."""
    grams = gram_sequence(data, independent=False)
    T = grams[0].shape[0]
    perm = np.array(data.draw(st.permutations(range(T))))
    plain, permuted = make(), make()
    for step, G in enumerate(grams):
        state = copy.deepcopy(plain.state_dict())
        for bucket in state["buckets"].values():
            bucket["weights"] = np.asarray(bucket["weights"])[perm].tolist()
        permuted.load_state_dict(state)  # the inner solvers here are stateless
        Gp = G[np.ix_(perm, perm)]
        w = plain(torch.from_numpy(G), step=step).numpy()
        w_perm = permuted(torch.from_numpy(Gp), step=step).numpy()
        assert same_direction(Gp, w[perm], w_perm, 1e-9)
