"""Proofs that bucket-level MOO inside PyTorch DDP computes what it claims (2 gloo ranks, CPU).

Every run trains the toy problem of ``toy.py`` (1,476 parameters) with rank t on language t; the
references are stock Lightning DDP, the DeepSpeed strategy, or plain autograd in this process.
"""

from __future__ import annotations

from pathlib import Path

import launch
import pytest
import torch
from checks import assert_close, assert_ranks_identical, language_grads
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_bucket_moo import trajectory, update_atol
from torch.nn.functional import cosine_similarity
from toy import make_net

from lightning_moo.solvers import MGDA
from lightning_moo.strategies import BucketMOODDPStrategy

T = 2
LR = 0.1
# 600 fp32 elements per DDP bucket: several buckets once DDP has rebuilt them after the first step.
BUCKET_MB = 600 * 4 / 2**20
MEAN_SPEC = {"class_path": "lightning_moo.solvers.Mean"}
MGDA_SPEC = {"class_path": "lightning_moo.solvers.MGDA"}
NASH_SPEC = {"class_path": "lightning_moo.solvers.NashMTL", "init_args": {"update_weights_every": 3}}
LANGUAGES = ["en", "de"]
PARAM_NAMES = [f"net.{n}" for n, _ in make_net().named_parameters()]


def run_ranks(runs: list[dict], out: Path) -> dict[str, list[dict]]:
    """launch.run_ranks with ddp_worker.py as the worker."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(launch, "WORKER", Path(__file__).with_name("ddp_worker.py"))
        return launch.run_ranks(runs, out, world_size=T, timeout=240)


# Runs that must fail, with what their error says. Last: the NaN error is raised inside a backward pass.
ERRORS = {
    "languages": (dict(languages=3), "3 languages need world size 3, got 2"),
    "nan": (dict(nan_at=[1, 1], ddp=dict(bucket_cap_mb=BUCKET_MB)), "non-finite gradient in DDP bucket"),
}


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ddp")


@pytest.fixture(scope="module")
def runs(out):
    """Every run, in one launch: starting the ranks costs more than training."""
    small = dict(bucket_cap_mb=BUCKET_MB)
    specs = []
    for opt, lr in (("sgd", LR), ("adam", 0.01)):
        common = dict(optimizer=opt, lr=lr, steps=3, ddp=small)
        specs += [dict(name=f"stock_{opt}", strategy="ddp_stock", **common), dict(name=f"mean_{opt}", solver=MEAN_SPEC, **common)]
    specs += [
        dict(name="mgda_sharded", solver=MGDA_SPEC, steps=3, ddp=small, languages=LANGUAGES, monitor=dict(log_every_n_steps=1, image_every_n_steps=100)),
        dict(name="mgda_allgather", solver=MGDA_SPEC, exchange="allgather", steps=3, ddp=small),
        dict(name="mgda_accumulate", solver=MGDA_SPEC, steps=2, accumulate=2, ddp=small),
        dict(name="mgda_static_graph", solver=MGDA_SPEC, steps=3, ddp=dict(small, static_graph=True, gradient_as_bucket_view=True)),
        # find_unused_parameters=True: DDP keeps its first bucket layout instead of rebuilding it, so
        # a resumed run solves the same buckets as the straight one.
        *(
            dict(name=name, solver=NASH_SPEC, optimizer="adam", lr=0.01, steps=4, ddp=dict(small, find_unused_parameters=True), **extra)
            for name, extra in (("straight", {}), ("resumed", dict(resume_at=2)))
        ),
        # fp16 with a GradScaler: language 1's NaN at step 1 must skip that step, as in stock DDP.
        *(
            dict(name=f"fp16_{name}", fp16_scaler=True, nan_at=[1, 1], steps=3, ddp=small, **extra)
            for name, extra in (("stock", dict(strategy="ddp_stock")), ("mean", dict(solver=MEAN_SPEC)), ("mgda", dict(solver=MGDA_SPEC)))
        ),
        # One bucket holding the whole model, in DDP and in DeepSpeed.
        dict(name="ddp_one_bucket", solver=MGDA_SPEC, steps=3, ddp=dict(bucket_cap_mb=100)),
        dict(name="deepspeed_global", strategy="moo", solver=MGDA_SPEC, mode="global", stage=2, steps=3),
    ]
    specs += [dict(name=name, solver=MGDA_SPEC, steps=3, expect_error=True, **spec) for name, (spec, _) in ERRORS.items()]
    return run_ranks(specs, out)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_mean_reproduces_stock_ddp(runs, opt):
    """Mean through the comm hook trains what Lightning's DDPStrategy trains, bit for bit."""
    stock, mean = runs[f"stock_{opt}"], runs[f"mean_{opt}"]
    assert_ranks_identical(mean)
    steps = mean[0]["buckets"]
    assert len(steps) == 3 and all(steps), "the hook did not reduce every step"
    assert all(b.weights.tolist() == [0.5, 0.5] for step in steps for b in step.values())
    for a, b in zip(trajectory(mean[0]), trajectory(stock[0])):
        for name in PARAM_NAMES:
            assert torch.equal(a[name], b[name]), name
    assert not torch.equal(stock[0]["params"]["net.0.weight"], stock[0]["snapshots"][0]["net.0.weight"]), "did not train"


def _check_mgda_per_bucket(result: dict, grads_at) -> int:
    """Every recorded bucket's applied update is MGDA of the per-language gradients (from ``grads_at``)
    of exactly that bucket's parameters; the buckets of a step tile the model. Returns the number of
    buckets whose languages conflicted."""
    thetas, conflicts = trajectory(result), 0
    for step, buckets in enumerate(result["buckets"]):
        names = [p.name for b in buckets.values() for p in b.params]
        assert sorted(names) == sorted(PARAM_NAMES), f"step {step}: buckets hold {names}"
        grads = grads_at(thetas[step], step)
        for b in buckets.values():
            assert b.step == step and [(p.start, p.end) for p in b.params][-1][1] == b.numel
            flat = lambda d: torch.cat([d[p.name].reshape(-1) for p in b.params]).double()  # noqa: E731
            g = torch.stack([flat(gr) for gr in grads])
            torch.testing.assert_close(b.gram, g @ g.T, rtol=1e-5, atol=1e-9)
            # The element ranges are right: one Gram per parameter, from exactly its elements.
            for p, pg in zip(b.params, b.param_grams):
                gp = torch.stack([gr[p.name].reshape(-1) for gr in grads]).double()
                torch.testing.assert_close(pg, gp @ gp.T, rtol=1e-5, atol=1e-9)
            d = (flat(thetas[step]) - flat(thetas[step + 1])) / LR
            torch.testing.assert_close(d, MGDA()(g @ g.T) @ g, rtol=1e-4, atol=update_atol(flat(thetas[step])))
            conflicts += int((g[0] @ g[1]) < 0)
    return conflicts


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["mgda_sharded", "mgda_allgather", "mgda_static_graph"])
def test_mgda_per_bucket_equals_autograd(runs, name):
    """Each bucket's update is the min-norm combination of the languages' autograd gradients of its
    parameters, whatever buckets DDP formed that step (one for the whole model before DDP rebuilds
    them, several afterwards with this bucket_cap_mb)."""
    result = runs[name]
    assert_ranks_identical(result)
    assert len(result[0]["buckets"]) == 3
    assert len(result[0]["buckets"][-1]) > 1, "one bucket only: the test would not prove per-bucket MOO"
    conflicts = _check_mgda_per_bucket(result[0], lambda theta, step: [language_grads(theta, t, step) for t in range(T)])
    assert conflicts > 0, "the toy languages never conflicted: the test would prove nothing"


@pytest.mark.timeout(300)
def test_conflict_monitor_logs_the_ddp_buckets(runs, out):
    """ConflictMonitor reads BucketMOODDPStrategy.buckets: its logged cosines are the autograd ones."""
    result = runs["mgda_sharded"][0]
    (events,) = (out / "mgda_sharded").glob("events.out.tfevents.*")  # the logger's run (languages have their own)
    acc = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
    acc.Reload()
    for step, buckets in enumerate(result["buckets"]):
        grads = [language_grads(trajectory(result)[step], t, step) for t in range(T)]
        groups = {"global": PARAM_NAMES, **{f"bucket_{i}": [p.name for p in b.params] for i, b in buckets.items()}}
        for group, names in groups.items():
            g = [torch.cat([gr[n].reshape(-1) for n in names]) for gr in grads]
            # Two languages: the mean pairwise cosine is their cosine.
            (logged,) = [e.value for e in acc.Scalars(f"conflict/{group}/cosine_mean") if e.step == step]
            assert logged == pytest.approx(float(cosine_similarity(g[0], g[1], dim=0)), abs=1e-5), (group, step)


@pytest.mark.timeout(300)
def test_sharded_equals_allgather(runs):
    sharded, allgather = runs["mgda_sharded"][0], runs["mgda_allgather"][0]
    for a, b in zip(trajectory(sharded), trajectory(allgather)):
        assert_close(a, b)
    for step_a, step_b in zip(sharded["buckets"], allgather["buckets"]):
        assert step_a.keys() == step_b.keys()
        for i in step_a:
            torch.testing.assert_close(step_a[i].weights, step_b[i].weights, rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(step_a[i].param_grams, step_b[i].param_grams, rtol=1e-6, atol=1e-9)


@pytest.mark.timeout(300)
def test_accumulation_solves_the_accumulated_gradients(runs):
    """accumulate_grad_batches=2: Lightning's no_sync keeps the first micro-batch local, so the hook
    fires once per optimizer step on each language's gradient averaged over its two micro-batches."""
    result = runs["mgda_accumulate"]
    assert_ranks_identical(result)

    def accumulated(theta, step):
        pairs = [(language_grads(theta, t, 2 * step), language_grads(theta, t, 2 * step + 1)) for t in range(T)]
        return [{n: (a[n] + b[n]) / 2 for n in a} for a, b in pairs]

    assert len(result[0]["buckets"]) == 2
    _check_mgda_per_bucket(result[0], accumulated)


@pytest.mark.timeout(300)
def test_one_bucket_equals_deepspeed_global(runs):
    """With one bucket holding the whole model, MGDA through DDP and through DeepSpeed ZeRO-2
    (mode='global') follow the same parameter trajectory."""
    ddp, deepspeed = runs["ddp_one_bucket"][0], runs["deepspeed_global"][0]
    assert all(len(step) == 1 for step in ddp["buckets"])
    for a, b in zip(trajectory(ddp), trajectory(deepspeed), strict=True):
        assert_close(a, b)


@pytest.mark.timeout(300)
def test_checkpoint_resumes_parameters_optimizer_and_solver_state(runs):
    """A run checkpointed after 2 steps and resumed equals the straight run, solver state included:
    Nash-MTL reuses step 0's weights until step 3, also across the resume."""
    straight, resumed = runs["straight"][0], runs["resumed"][0]
    assert_ranks_identical(runs["resumed"])
    for name, p in straight["params"].items():
        assert torch.equal(resumed["params"][name], p), name
    assert len(resumed["buckets"][2]) > 1
    for i, b in resumed["buckets"][2].items():
        assert torch.equal(b.weights, straight["buckets"][0][i].weights)
        assert not torch.equal(b.weights, resumed["buckets"][3][i].weights)


@pytest.mark.timeout(300)
def test_fp16_overflow_skips_the_step_like_stock_ddp(runs):
    """Under fp16 loss scaling a non-finite bucket is not an error: the GradScaler skips the step."""
    for name in ("fp16_stock", "fp16_mean", "fp16_mgda"):
        result = runs[name][0]
        assert result["error"] is None, (name, result["error"])
        before, after = trajectory(result)[1:3]
        assert all(torch.equal(before[n], after[n]) for n in PARAM_NAMES), f"{name}: step 1 was not skipped"
        assert not torch.equal(result["params"]["net.0.weight"], after["net.0.weight"]), f"{name}: step 2 did not train"
        if name != "fp16_stock":  # the skipped step leaves no NaN Grams for monitoring
            assert result["buckets"][1] == {} and result["buckets"][2], name
    for a, b in zip(trajectory(runs["fp16_mean"][0]), trajectory(runs["fp16_stock"][0])):
        assert all(torch.equal(a[n], b[n]) for n in PARAM_NAMES)


def test_refuses_other_comm_hooks():
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    with pytest.raises(MisconfigurationException, match=r"\['ddp_comm_hook'\] would replace that hook"):
        BucketMOODDPStrategy(ddp_comm_hook=allreduce_hook)


@pytest.mark.timeout(300)
def test_refuses_what_the_hook_cannot_serve(runs):
    for name, (_, message) in ERRORS.items():
        for rank in range(T):
            error = runs[name][rank]["error"]
            assert error is not None and message in error, (name, error)
    error = runs["nan"][0]["error"]
    assert "at step 1" in error and "language 1: net.4.bias" in error and "language 0" not in error, error
