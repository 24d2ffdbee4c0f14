"""Proofs for bucket-level MOO inside DeepSpeed ZeRO-3 (2 gloo ranks, CPU, the toy problem of ``toy.py``).

ZeRO-3 partitions every parameter over the ranks and reduce-scatters each bucket of full gradients;
the hook replaces that reduce-scatter. References: stock ZeRO-3 in the same processes (bit for bit:
with 2 ranks halving is exact, so the combination's rank-order sum rounds as the reduce-scatter's)
and plain autograd here.
"""

from __future__ import annotations

import pytest
import torch
from checks import assert_close, assert_mgda_per_bucket, assert_ranks_identical, assert_resumed_equals_straight, language_grads
from launch import run_ranks
from test_bucket_moo import BUCKET, LR, solver, trajectory
from toy import make_net

T = 2
SGD = dict(stage=3, steps=3, lr=LR, reduce_bucket_size=BUCKET)


def config(**zero) -> dict:
    return {
        # Threshold 0: every parameter partitioned from the first step on (by default ZeRO-3 keeps those
        # under 1e5 elements whole once it has traced a step, as the kwargs-only variants do here).
        "zero_optimization": {"stage": 3, "reduce_bucket_size": BUCKET, "overlap_comm": True,
                              "stage3_param_persistence_threshold": 0, **zero},
        "train_micro_batch_size_per_gpu": 1,
        "zero_allow_untested_optimizer": True,
        # A torch optimizer with offloaded states: DeepSpeedCPUAdam would need a compiled extension.
        "zero_force_ds_cpu_optimizer": False,
    }


# Stock ZeRO-3 and Mean through the hook, per variant: (strategy arguments, precision).
VARIANTS = {
    "reduce_scatter": (dict(stage=3, reduce_bucket_size=BUCKET), "32-true"),
    # reduce_scatter=false: ZeRO-3 all-reduces the contiguous bucket instead (the hook's padded variant).
    "all_reduce": (dict(stage=3, reduce_bucket_size=BUCKET, reduce_scatter=False, overlap_comm=False), "32-true"),
    "bf16": (dict(config=config()), "bf16-mixed"),
    "offload_optimizer": (dict(config=config(offload_optimizer={"device": "cpu"})), "32-true"),
    "offload_param": (dict(config=config(offload_param={"device": "cpu"})), "32-true"),
}


@pytest.fixture(scope="module")
def zero3_runs(tmp_path_factory):
    runs = []
    for tag, (args, precision) in VARIANTS.items():
        common = dict(optimizer="adam", lr=0.01, steps=3, precision=precision, **args)
        runs += [dict(name=f"stock_{tag}", strategy="stock", **common), dict(name=f"mean_{tag}", solver=solver("Mean"), **common)]
    runs += [dict(name=f"{s}_{x}", solver=solver(s), exchange=x, **SGD) for s in ("MGDA", "CAGrad") for x in ("sharded", "allgather")]
    runs += [
        dict(name="global", solver=solver("MGDA"), mode="global", exchange="allgather", **SGD),
        dict(name="four_languages", solver=solver("MGDA"), languages=4, languages_per_rank=2, **SGD),
    ]
    # Nash-MTL keeps step 0's weights until step 3: solver state that a resume must carry over.
    nash = dict(solver=solver("NashMTL", update_weights_every=3), stage=3, optimizer="adam", lr=0.01, steps=4, reduce_bucket_size=BUCKET)
    runs += [dict(name="straight", **nash), dict(name="resumed", resume_at=2, **nash)]
    return run_ranks(runs, tmp_path_factory.mktemp("zero3"), timeout=400)


@pytest.mark.timeout(500)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mean_reproduces_stock_zero3(zero3_runs, variant):
    stock, mean = zero3_runs[f"stock_{variant}"], zero3_runs[f"mean_{variant}"]
    assert_ranks_identical(mean)
    steps = mean[0]["buckets"]
    # The hook really ran: every step's buckets went through the solver.
    assert len(steps) == len(mean[0]["snapshots"]) == 3 and all(steps)
    assert all(b.weights.tolist() == [0.5, 0.5] for step in steps for b in step.values())
    for theirs, ours in zip(trajectory(stock[0]), trajectory(mean[0])):
        for name, p in theirs.items():
            assert torch.equal(ours[name], p), f"{variant}: {name} differs from stock ZeRO-3"
    for name, p in stock[0]["params"].items():
        assert not torch.equal(p, stock[0]["snapshots"][0][name]), f"{variant}: {name} did not train"


@pytest.mark.timeout(500)
@pytest.mark.parametrize("name", ["MGDA", "CAGrad"])
def test_sharded_equals_allgather(zero3_runs, name):
    sharded, allgather = zero3_runs[f"{name}_sharded"], zero3_runs[f"{name}_allgather"]
    assert_ranks_identical(sharded)
    for a, b in zip(trajectory(sharded[0]), trajectory(allgather[0])):
        assert_close(a, b)


@pytest.mark.timeout(500)
def test_mgda_per_bucket_is_mgda_of_the_autograd_gradients(zero3_runs):
    """Every bucket's Gram is that of plain-autograd gradients of its parameters and its update is
    MGDA of them; the buckets name every parameter exactly once per step, with its element range."""
    result = zero3_runs["MGDA_sharded"]
    assert_ranks_identical(result)
    thetas = trajectory(result[0])
    sizes = {f"net.{n}": p.numel() for n, p in make_net().named_parameters()}
    for buckets in result[0]["buckets"]:
        names = [p.name for i in sorted(buckets) for p in buckets[i].params]
        assert sorted(names) == sorted(sizes)
        for b in buckets.values():
            assert [p.end - p.start for p in b.params] == [sizes[p.name] for p in b.params]
            assert b.params[0].start == 0 and b.numel == b.params[-1].end
    grads_at = lambda step: [language_grads(thetas[step], t, step) for t in range(T)]  # noqa: E731
    assert_mgda_per_bucket(thetas, result[0]["buckets"], grads_at, LR, buckets_per_step=3)


@pytest.mark.timeout(500)
def test_global_mode_is_mgda_of_the_whole_gradients(zero3_runs):
    result = zero3_runs["global"]
    thetas = trajectory(result[0])
    grads_at = lambda step: [language_grads(thetas[step], t, step) for t in range(T)]  # noqa: E731
    assert_mgda_per_bucket(thetas, result[0]["buckets"], grads_at, LR, buckets_per_step=1)


@pytest.mark.timeout(500)
def test_two_ranks_with_two_languages_each_solve_all_four(zero3_runs):
    result = zero3_runs["four_languages"]
    assert_ranks_identical(result)
    thetas = trajectory(result[0])
    grads_at = lambda step: [language_grads(thetas[step], t, step) for t in range(4)]  # noqa: E731
    assert_mgda_per_bucket(thetas, result[0]["buckets"], grads_at, LR, buckets_per_step=3)


@pytest.mark.timeout(500)
def test_checkpoint_resumes_parameters_optimizer_and_solver_state(zero3_runs):
    assert_resumed_equals_straight(zero3_runs["straight"], zero3_runs["resumed"])


@pytest.mark.timeout(300)
def test_refuses_what_the_zero3_hook_cannot_serve(tmp_path):
    mgda = solver("MGDA")
    cases = {
        "two_pass": (dict(mode="global_two_pass"), "mode='global_two_pass' does not work with ZeRO stage 3"),
        "accumulation": (dict(accumulate=2), "ZeRO-3 reduces every micro-batch"),
        "quantized": (dict(config=config(zero_quantized_gradients=True)), "(ZeRO++ qgZ) reduces gradients by a quantized"),
        "mics": (dict(config=config(mics_shard_size=1)), "mics_shard_size partitions parameters over groups smaller"),
        # Last: raised inside the backward, on every rank.
        "nan": (dict(nan_at=[1, 1]), "non-finite gradient in ZeRO bucket 0 at step 1"),
    }
    runs = [dict(name=name, solver=mgda, expect_error=True, **{**SGD, **spec}) for name, (spec, _) in cases.items()]
    res = run_ranks(runs, tmp_path)
    for name, (_, message) in cases.items():
        for rank in range(T):
            error = res[name][rank]["error"]
            assert error is not None and message in error, (name, error)
    # Named once, though the bucket reaches the solver as one chunk of it per rank.
    assert res["nan"][0]["error"].count("language 1: net.4.bias") == 1 and "language 0" not in res["nan"][0]["error"]


@pytest.mark.timeout(400)
def test_language_groups_combine_the_language_means(tmp_path):
    """4 ranks, 2 per language: each bucket's update is MGDA of the two languages' mean gradients."""
    spec = dict(name="groups", solver=solver("MGDA"), languages=T, ranks_per_language=2, **SGD)
    result = run_ranks([spec], tmp_path, world_size=4, timeout=300)["groups"]
    assert_ranks_identical(result)
    thetas = trajectory(result[0])
    means_at = lambda step: [language_grads(thetas[step], t, step, replicas=2) for t in range(T)]  # noqa: E731
    assert_mgda_per_bucket(thetas, result[0]["buckets"], means_at, LR, buckets_per_step=3)
