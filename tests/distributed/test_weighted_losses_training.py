"""Loss-based weightings under BucketMOOStrategy: each rank scales its language's loss, DeepSpeed
reduces the stock way, and the update is Σ_t w_t ∇L_t with the paper's weights of the languages'
losses — checked against plain autograd on the toy problem."""

from __future__ import annotations

import pytest
import torch
from checks import assert_close, assert_ranks_identical, language_grads, load
from launch import run_ranks
from test_bucket_moo import BUCKET, LR, solver, trajectory
from test_ddp import run_ranks as run_ddp_ranks
from toy import loss_fn, make_net

T, STEPS = 2, 4
COMMON = dict(optimizer="sgd", lr=LR, reduce_bucket_size=BUCKET, steps=STEPS)


def losses_at(theta: dict, step: int) -> torch.Tensor:
    net = load(make_net(), theta)
    with torch.no_grad():
        return torch.stack([loss_fn(net, t, step) for t in range(T)]).double()


def gls(history: list[torch.Tensor]) -> torch.Tensor:
    losses = history[-1]
    return losses.prod() ** (1 / T) / (T * losses)


def dwa(history: list[torch.Tensor]) -> torch.Tensor:
    if len(history) < 3:
        return torch.ones(T, dtype=torch.float64)
    e = torch.exp(history[-2] / history[-3] / 2.0)
    return T * e / e.sum()


def assert_weighted_sgd(result: dict, weights_of) -> None:
    """θ_s+1 = θ_s − lr Σ_t w_t ∇L_t(θ_s), the weights from the losses at θ_s (and earlier steps)."""
    thetas, history = trajectory(result), []
    for step in range(STEPS):
        history.append(losses_at(thetas[step], step))
        w = weights_of(history)
        grads = [language_grads(thetas[step], t, step) for t in range(T)]
        expected = {n: (thetas[step][n].double() - LR * sum(w[t] * grads[t][n].double() for t in range(T))).float()
                    for n in thetas[0]}
        assert_close(thetas[step + 1], expected, rtol=1e-5)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    runs = [
        dict(name="gls", solver=solver("GLS"), **COMMON),
        dict(name="dwa", solver=solver("DWA"), **COMMON),
        dict(name="uw", solver=solver("UW", lr=0.05), **COMMON),
        dict(name="uw_resumed", solver=solver("UW", lr=0.05), resume_at=2, **COMMON),
        dict(name="famo", solver=solver("FAMO"), **COMMON),
        dict(name="famo_resumed", solver=solver("FAMO"), resume_at=2, **COMMON),
        dict(name="global", solver=solver("GLS"), mode="global", expect_error=True, **COMMON),
    ]
    return run_ranks(runs, tmp_path_factory.mktemp("loss_weightings"))


@pytest.mark.timeout(400)
@pytest.mark.parametrize("name, weights_of", [("gls", gls), ("dwa", dwa)])
def test_update_is_the_weighted_sum_of_language_gradients(two_ranks, name, weights_of):
    assert_ranks_identical(two_ranks[name])
    assert two_ranks[name][0]["buckets"] == [{}] * STEPS  # no bucket hook: stock reduction
    assert_weighted_sgd(two_ranks[name][0], weights_of)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("name", ["uw", "famo"])
def test_checkpoint_resume_equals_the_straight_run(two_ranks, name):
    """Learned state (log-variances, logits, Adam moments, previous losses) resumes exactly."""
    straight, resumed = two_ranks[name][0]["params"], two_ranks[f"{name}_resumed"][0]["params"]
    for n in straight:
        assert torch.equal(straight[n], resumed[n]), n
    moved = trajectory(two_ranks[name][0])
    assert any(not torch.equal(moved[0][n], moved[-1][n]) for n in straight)


@pytest.mark.timeout(400)
def test_global_modes_are_refused(two_ranks):
    for rank_result in two_ranks["global"]:
        assert "GLS weighs each optimizer step's losses before the backward: use mode='bucket'" in rank_result["error"]


@pytest.mark.timeout(400)
def test_one_process_with_two_languages_equals_the_two_rank_run(two_ranks, tmp_path):
    single = run_ranks([dict(name="gls", languages=2, languages_per_rank=2, solver=solver("GLS"), **COMMON),
                        dict(name="dwa", languages=2, languages_per_rank=2, solver=solver("DWA"), **COMMON)],
                       tmp_path, world_size=1)
    for name in ("gls", "dwa"):
        for a, b in zip(trajectory(single[name][0]), trajectory(two_ranks[name][0])):
            assert_close(a, b, rtol=1e-6)


@pytest.mark.timeout(400)
def test_ddp_scales_the_losses_and_averages_stock(two_ranks, tmp_path):
    """BucketMOODDPStrategy with a loss weighting registers no comm hook and trains what the
    DeepSpeed strategy trains (the same Σ_t w_t ∇L_t); accumulation is refused."""
    runs = run_ddp_ranks([dict(name="gls", solver=solver("GLS"), optimizer="sgd", lr=LR, steps=STEPS),
                          dict(name="accumulate", solver=solver("DWA"), steps=2, accumulate=2, expect_error=True)], tmp_path)
    assert_ranks_identical(runs["gls"])
    assert_weighted_sgd(runs["gls"][0], gls)
    for rank_result in runs["accumulate"]:
        assert "DWA weighs each optimizer step's losses before the backward: use accumulate_grad_batches=1" in rank_result["error"]


@pytest.mark.timeout(600)
def test_every_registered_solver_trains(tmp_path):
    """Each solver by its registered short name: three ZeRO-2 steps on two ranks, finite parameters
    identical on both ranks, and they moved."""
    from lightning_moo.solvers import solver_class_path, solver_names

    runs = [dict(name=name, solver={"class_path": solver_class_path(name)}, **dict(COMMON, steps=3)) for name in solver_names()]
    results = run_ranks(runs, tmp_path)
    for name in solver_names():
        assert_ranks_identical(results[name])
        start, end = trajectory(results[name][0])[0], results[name][0]["params"]
        assert all(bool(torch.isfinite(p).all()) for p in end.values()), name
        assert any(not torch.equal(start[n], end[n]) for n in end), name
