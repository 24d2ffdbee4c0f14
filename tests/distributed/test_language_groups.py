"""Language groups: 4 gloo ranks train 2 languages, 2 ranks each (world = k × T with k = 2).

Ranks 2t and 2t + 1 train language t on different batches. References: stock DeepSpeed on the same
4 ranks, and plain autograd on the mean of each language's two batches.
"""

from __future__ import annotations

import pytest
import torch
from checks import assert_close, assert_mgda_per_bucket, assert_ranks_identical, language_grads
from launch import run_ranks
from test_bucket_moo import BUCKET, LR, solver, trajectory

from lightning_moo.solvers import MGDA

T, K = 2, 2
COMMON = dict(ranks_per_language=K, reduce_bucket_size=BUCKET, steps=3)


@pytest.fixture(scope="module")
def group_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("groups")
    adam = dict(optimizer="adam", lr=0.01, **COMMON)
    sgd = dict(optimizer="sgd", lr=LR, languages=T, **COMMON)
    runs = [
        dict(name="stock", strategy="stock", **adam),
        dict(name="mean", solver=solver("Mean"), languages=T, **adam),
        dict(name="mgda_sharded", solver=solver("MGDA"), **sgd),
        dict(name="mgda_allgather", solver=solver("MGDA"), exchange="allgather", **sgd),
        dict(name="two_pass", solver=solver("MGDA"), mode="global_two_pass", **sgd),
        dict(name="three_languages", solver=solver("MGDA"), expect_error=True, **{**sgd, "languages": 3}),
    ]
    return run_ranks(runs, out, world_size=T * K, timeout=300)


@pytest.mark.timeout(400)
def test_mean_with_groups_is_stock_deepspeed(group_runs):
    assert_ranks_identical(group_runs["mean"])
    stock, mean = group_runs["stock"][0], group_runs["mean"][0]
    assert all(b.weights.tolist() == [0.5, 0.5] for step in mean["buckets"] for b in step.values())
    for name, p in stock["params"].items():
        assert not torch.equal(p, stock["snapshots"][0][name]), f"{name} did not train"
    # Not bit for bit: gloo's 4-rank all-reduce adds in its own order, the combination in rank order.
    for theirs, ours in zip(trajectory(stock), trajectory(mean)):
        assert_close(ours, theirs, rtol=1e-6)


@pytest.mark.timeout(400)
def test_mgda_combines_the_language_means_per_bucket(group_runs):
    """Each bucket's Gram is that of the two languages' mean gradients (over their two ranks), and
    the applied direction is MGDA of it; sharded and allgather agree."""
    result = group_runs["mgda_sharded"]
    assert_ranks_identical(result)
    thetas = trajectory(result[0])
    means_at = lambda step: [language_grads(thetas[step], t, step, replicas=K) for t in range(T)]  # noqa: E731
    assert_mgda_per_bucket(thetas, result[0]["buckets"], means_at, LR, buckets_per_step=3)
    for a, b in zip(trajectory(group_runs["mgda_allgather"][0]), thetas):
        assert_close(a, b)


@pytest.mark.timeout(400)
def test_global_two_pass_with_groups_is_offline_mgda_of_the_means(group_runs):
    result = group_runs["two_pass"]
    assert_ranks_identical(result)
    thetas = trajectory(result[0])
    for step in range(len(thetas) - 1):
        means = [language_grads(thetas[step], t, step, replicas=K) for t in range(T)]
        g = torch.stack([torch.cat([m[n].reshape(-1) for n in thetas[0]]) for m in means]).double()
        w = MGDA()(g @ g.T)
        expected = {n: (thetas[step][n] - LR * sum(w[t] * means[t][n].double() for t in range(T))).float() for n in thetas[0]}
        assert_close(thetas[step + 1], expected)


@pytest.mark.timeout(400)
def test_world_size_not_a_multiple_of_the_languages_is_refused(group_runs):
    for rank_result in group_runs["three_languages"]:
        error = rank_result["error"]
        assert error and "world size 4" in error and "not a multiple of 3 languages" in error, error
