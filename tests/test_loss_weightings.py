"""Loss-based weightings against independent computations: autograd of each paper's objective,
torch.optim.Adam where a method learns, and hand-written recursions."""

import copy

import numpy as np
import pytest
import torch

from lightning_moo.solvers import DWA, FAMO, GLS, RLW, UW, LossWeighting, get_solver, solver_class, solver_names

LOSSES = [torch.tensor(v, dtype=torch.float64) for v in
          ([2.0, 1.0, 3.0], [1.5, 0.9, 2.9], [1.2, 0.95, 2.0], [1.1, 0.7, 1.9], [0.9, 0.72, 1.5], [0.8, 0.6, 1.4])]


def run(weighting: LossWeighting, losses=LOSSES, start: int = 0) -> list[torch.Tensor]:
    return [weighting.weigh(loss, step) for step, loss in enumerate(losses, start)]


def test_gls_weights_are_the_gradient_of_the_geometric_mean():
    for losses in LOSSES:
        leaf = losses.clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(leaf.prod() ** (1 / leaf.numel()), leaf)
        torch.testing.assert_close(GLS().weigh(losses, 0), expected)


def test_uw_is_kendall_objective_trained_by_adam():
    s = torch.nn.Parameter(torch.full((3,), -0.5, dtype=torch.float64))
    adam = torch.optim.Adam([s], lr=0.05)
    weighting = UW(lr=0.05)
    for step, losses in enumerate(LOSSES):
        leaf = losses.clone().requires_grad_(True)
        objective = (leaf / (2 * s.exp()) + s / 2).sum()  # LibMTL's form of Kendall et al.
        expected = torch.autograd.grad(objective, leaf, retain_graph=True)[0]
        torch.testing.assert_close(weighting.weigh(losses, step), expected)
        adam.zero_grad()
        objective.backward()
        adam.step()
    torch.testing.assert_close(weighting.bucket_state()["log_var"], s.detach())


def test_famo_follows_the_papers_algorithm():
    """The authors' algorithm written with autograd and torch.optim.Adam: weights are the gradient
    of sum(z log D) / c (c held fixed) w.r.t. the losses; logits move by Adam along the softmax's
    vector-Jacobian product with the decrease of the log-losses."""
    logits = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    adam = torch.optim.Adam([logits], lr=0.025, weight_decay=1e-3)
    weighting, previous = FAMO(), None
    for step, losses in enumerate(LOSSES):
        D = losses + 1e-8
        if previous is not None:
            delta = previous.log() - D.log()
            (grad,) = torch.autograd.grad(torch.softmax(logits, -1), logits, grad_outputs=delta)
            adam.zero_grad()
            logits.grad = grad
            adam.step()
        previous = D
        z = torch.softmax(logits, -1).detach()
        leaf = losses.clone().requires_grad_(True)
        c = (z / D).sum()
        (expected,) = torch.autograd.grad(((leaf + 1e-8).log() * z / c).sum(), leaf)
        torch.testing.assert_close(weighting.weigh(losses, step), expected)


@pytest.mark.parametrize("window", [1, 2])
def test_dwa_is_the_softmax_of_loss_ratios(window):
    T, temperature = 3, 2.0
    means = [torch.stack(LOSSES[i : i + window]).mean(0) for i in range(0, len(LOSSES) - window + 1, window)]
    got = run(DWA(temperature, window))
    for step, w in enumerate(got):
        done = (step // window)  # windows complete before this step
        if done < 2:
            expected = torch.ones(T, dtype=torch.float64)
        else:
            ratio = means[done - 1] / means[done - 2]
            e = torch.exp(ratio / temperature)
            expected = T * e / e.sum()
        torch.testing.assert_close(w, expected)


def test_rlw_draws_softmax_normal_weights_per_step():
    weighting = RLW(seed=3)
    draws = torch.stack([weighting.weigh(torch.ones(4, dtype=torch.float64), step) for step in range(3000)])
    assert bool((draws > 0).all()) and torch.allclose(draws.sum(1), torch.ones(3000, dtype=torch.float64))
    torch.testing.assert_close(draws.mean(0), torch.full((4,), 0.25, dtype=torch.float64), atol=0.01, rtol=0)
    # The same (seed, step) on another rank or after a resume: the same weights; other steps differ.
    torch.testing.assert_close(RLW(seed=3).weigh(torch.ones(4), 17), draws[17])
    assert not torch.allclose(draws[17], draws[18])
    # log-weights minus their mean are the centred normal draws: their spread is about 1.
    centred = draws.log() - draws.log().mean(1, keepdim=True)
    assert abs(float(centred.std()) * np.sqrt(4 / 3) - 1.0) < 0.05


@pytest.mark.parametrize("name", ["uw", "dwa", "famo"])
def test_state_resumes_exactly(name):
    straight = run(get_solver(name))
    first = get_solver(name)
    run(first, LOSSES[:3])
    resumed = get_solver(name)
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    for a, b in zip(straight[3:], run(resumed, LOSSES[3:], start=3)):
        assert torch.equal(a, b)


def test_every_registered_loss_weighting_declares_itself():
    names = [n for n in solver_names() if not solver_class(n).uses_gram]
    assert set(names) >= {"uw", "dwa", "rlw", "gls", "famo"}
    for name in names:
        weighting = get_solver(name)
        assert weighting.needs_losses
        assert not (weighting.conflict_free or weighting.scale_invariant)
        with pytest.raises(TypeError, match="weighs losses, not gradients"):
            weighting(torch.eye(3))


def test_bad_losses_are_refused_with_the_task():
    with pytest.raises(ValueError, match=r"task\(s\) \[1\] is NaN/Inf"):
        DWA().weigh(torch.tensor([1.0, float("nan"), 2.0]), 0)
    with pytest.raises(ValueError, match="must be positive"):
        GLS().weigh(torch.tensor([1.0, 0.0]), 0)
    with pytest.raises(ValueError, match="above min_losses"):
        FAMO(min_losses=2.0).weigh(torch.tensor([1.0, 3.0]), 0)
