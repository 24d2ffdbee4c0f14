"""Proofs that bucket-level MOO inside FSDP2 computes what it claims (gloo on CPU, 2 and 4 ranks).

Every run trains the toy problem of ``toy.py`` (1,476 parameters) with each of its three Linear
layers a ``fully_shard`` unit, i.e. a bucket; the references are stock FSDP2 (Lightning's
ModelParallelStrategy) run side by side, and plain autograd per-language gradients with a
brute-force min-norm solve in this process. The 4-rank runs train LoRA adapters, whose 2-row
matrices shard unevenly (chunks of 1, 1, 0 and 0 rows), which exercises FSDP's padded layout.
"""

from __future__ import annotations

from pathlib import Path

import launch
import numpy as np
import pytest
import torch
import yaml
from checks import assert_close, assert_ranks_identical, assert_resumed_equals_straight, language_grads
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_bucket_moo import trajectory, update_atol
from test_cli import cli, scalars
from test_solver_properties import brute_force_min_norm
from torch.nn.functional import cosine_similarity
from toy import make_net

from lightning_moo.solvers import MGDA

LR = 0.1
MEAN_SPEC = {"class_path": "lightning_moo.solvers.Mean"}
MGDA_SPEC = {"class_path": "lightning_moo.solvers.MGDA"}
NASH_SPEC = {"class_path": "lightning_moo.solvers.NashMTL", "init_args": {"update_weights_every": 3}}
PARAM_NAMES = [f"net.{n}" for n, _ in make_net().named_parameters()]
# The strategy shards the Linear layers itself; without ``units`` the toy's configure_model does.
UNITS = dict(units=["Linear"])
REPO = Path(__file__).resolve().parents[2]


def run_ranks(runs: list[dict], out: Path, world: int) -> dict[str, list[dict]]:
    """launch.run_ranks with fsdp_worker.py as the worker."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(launch, "WORKER", Path(__file__).with_name("fsdp_worker.py"))
        return launch.run_ranks(runs, out, world_size=world, timeout=240)


# Runs that must fail before the first step, with what their error says.
ERRORS = {
    "languages_per_rank": (dict(languages=4), "would put 2 on a rank"),
    "no_units": (dict(fsdp=dict(units=["Conv2d"])), "found no module of the classes ['Conv2d']"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every 2-rank run, in one launch: starting the ranks costs more than training."""
    out = tmp_path_factory.mktemp("fsdp")
    specs = []
    for opt, lr in (("sgd", LR), ("adam", 0.01)):
        common = dict(optimizer=opt, lr=lr, steps=3)
        specs += [dict(name=f"stock_{opt}", strategy="fsdp_stock", **common), dict(name=f"mean_{opt}", solver=MEAN_SPEC, **common)]
    specs += [
        dict(name="mgda_sharded", solver=MGDA_SPEC, steps=3, fsdp=UNITS, languages=["en", "de"],
             monitor=dict(log_every_n_steps=1, image_every_n_steps=100)),
        dict(name="mgda_allgather", solver=MGDA_SPEC, exchange="allgather", steps=3, fsdp=UNITS),
        dict(name="mgda_offload", solver=MGDA_SPEC, steps=3, fsdp=dict(UNITS, cpu_offload=True)),
        dict(name="mgda_accumulate", solver=MGDA_SPEC, steps=2, accumulate=2, fsdp=UNITS),
        *(
            dict(name=name, solver=NASH_SPEC, optimizer="adam", lr=0.01, steps=4, fsdp=UNITS, **extra)
            for name, extra in (("straight", {}), ("resumed", dict(resume_at=2)))
        ),
    ]
    specs += [dict(dict(name=name, solver=MGDA_SPEC, steps=2, expect_error=True), **spec) for name, (spec, _) in ERRORS.items()]
    return out, run_ranks(specs, out, world=2)


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    """4 ranks, 2 languages of 2 ranks each (different batches), LoRA adapters of rank 2 on frozen
    layers: the adapters' 2-row matrices shard unevenly (1, 1 and two empty, padded chunks)."""
    common = dict(steps=2, lora=True, languages=2, ranks_per_language=2)
    specs = [dict(name="stock", strategy="fsdp_stock", **common), dict(name="mean", solver=MEAN_SPEC, **common),
             dict(name="mgda", solver=MGDA_SPEC, fsdp=UNITS, **common)]
    return run_ranks(specs, tmp_path_factory.mktemp("fsdp_groups"), world=4)


def check_min_norm_per_bucket(result: dict, grads_at, languages: int, buckets_per_step: int = 3) -> int:
    """Every step's buckets tile the model's parameters (names, contiguous element ranges); each
    bucket's recorded Gram (and per-parameter Grams) are those of the autograd gradients
    ``grads_at(θ, step)`` of its parameters, and its applied update ``(θ_s − θ_s+1) / LR`` is their
    min-norm convex combination: a combination with weights on the simplex whose squared norm is
    the brute-force minimum over every support. Returns the number of conflicting buckets."""
    thetas, conflicts = trajectory(result), 0
    for step, buckets in enumerate(result["buckets"]):
        assert len(buckets) == buckets_per_step, f"step {step}: {len(buckets)} buckets"
        grads = grads_at(thetas[step], step)
        names = [p.name for b in buckets.values() for p in b.params]
        assert sorted(names) == sorted(grads[0]), f"step {step}: buckets hold {names}, not the trainable parameters"
        for b in buckets.values():
            ranges = [(p.start, p.end) for p in b.params]
            assert ranges[0][0] == 0 and ranges[-1][1] == b.numel and all(a[1] == c[0] for a, c in zip(ranges, ranges[1:]))
            assert b.step == step
            flat = lambda d: torch.cat([d[p.name].reshape(-1) for p in b.params]).double()  # noqa: E731
            g = torch.stack([flat(gr) for gr in grads])
            G = g @ g.T
            torch.testing.assert_close(b.gram, G, rtol=1e-5, atol=1e-9)
            for p, pg in zip(b.params, b.param_grams):
                assert p.end - p.start == grads[0][p.name].numel()
                gp = torch.stack([gr[p.name].reshape(-1) for gr in grads]).double()
                torch.testing.assert_close(pg, gp @ gp.T, rtol=1e-5, atol=1e-9)
            d = (flat(thetas[step]) - flat(thetas[step + 1])) / LR
            atol = update_atol(flat(thetas[step]))
            # Independently of the solver's code: d is a convex combination of the gradients ...
            w = torch.linalg.lstsq(g.T, d.unsqueeze(1)).solution.squeeze(1)
            torch.testing.assert_close(g.T @ w, d, rtol=0, atol=10 * atol)
            assert (w >= -1e-4).all() and abs(float(w.sum()) - 1) < 1e-4, w
            # ... of the least norm (the min-norm point of the hull is unique).
            assert float(d @ d) == pytest.approx(brute_force_min_norm(G.numpy()), rel=1e-3)
            # And tightly: MGDA's own weights for this Gram, applied to these gradients.
            torch.testing.assert_close(d, MGDA()(G) @ g, rtol=1e-4, atol=atol)
            conflicts += int((G < 0).any())
    assert len(result["buckets"]) == len(thetas) - 1 and languages == len(grads)
    return conflicts


def per_language(languages: int, replicas: int = 1, lora: bool = False):
    return lambda theta, step: [language_grads(theta, t, step, replicas, lora) for t in range(languages)]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_mean_reproduces_stock_fsdp_bit_for_bit(runs, opt):
    """2 ranks: Mean through the custom reduce-scatter trains what stock FSDP2 trains, bit for bit
    (0.5·g0 + 0.5·g1 and gloo's (g0 + g1) / 2 round alike)."""
    _, results = runs
    stock, mean = results[f"stock_{opt}"], results[f"mean_{opt}"]
    assert_ranks_identical(mean)
    assert len(mean[0]["buckets"]) == 3 and all(len(step) == 3 for step in mean[0]["buckets"])
    assert all(b.weights.tolist() == [0.5, 0.5] for step in mean[0]["buckets"] for b in step.values())
    for a, b in zip(trajectory(mean[0]), trajectory(stock[0]), strict=True):
        for name in PARAM_NAMES:
            assert torch.equal(a[name], b[name]), name
    assert not torch.equal(stock[0]["params"]["net.0.weight"], stock[0]["snapshots"][0]["net.0.weight"]), "did not train"


@pytest.mark.timeout(300)
def test_mean_reproduces_stock_fsdp_on_uneven_shards_and_language_groups(groups):
    """4 ranks, padded uneven shards, frozen parameters: Mean (weights w_t / k = 1/4 per rank) equals
    stock FSDP2 up to the rounding of a different reduction order (Σ ¼·g_r against gloo's
    (Σ g_r) / 4); stock FSDP itself is the mean of the four ranks' autograd gradients."""
    stock, mean = groups["stock"][0], groups["mean"][0]
    assert_ranks_identical(groups["mean"])
    for a, b in zip(trajectory(mean), trajectory(stock), strict=True):
        assert_close(a, b, rtol=1e-6)
    thetas = trajectory(stock)
    for step in range(2):
        grads = per_language(2, replicas=2, lora=True)(thetas[step], step)
        for name in grads[0]:
            expected = thetas[step][name] - LR * (grads[0][name] + grads[1][name]) / 2
            torch.testing.assert_close(thetas[step + 1][name], expected, rtol=0, atol=1e-6)
    assert all(torch.equal(thetas[0][n], thetas[-1][n]) for n in thetas[0] if "base_layer" in n), "a frozen weight moved"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["mgda_sharded", "mgda_allgather"])
def test_mgda_per_bucket_equals_min_norm_of_autograd_gradients(runs, name):
    _, results = runs
    assert_ranks_identical(results[name])
    assert check_min_norm_per_bucket(results[name][0], per_language(2), 2) > 0, "no conflict: the test would prove nothing"


@pytest.mark.timeout(300)
def test_language_groups_on_uneven_shards(groups):
    """Each bucket (one per LoRA matrix: the units the strategy sharded that have trainable
    parameters) is updated by the min-norm combination of the 2 language means' gradients."""
    assert_ranks_identical(groups["mgda"])
    check_min_norm_per_bucket(groups["mgda"][0], per_language(2, replicas=2, lora=True), 2, buckets_per_step=6)


@pytest.mark.timeout(300)
def test_sharded_equals_allgather(runs):
    _, results = runs
    sharded, allgather = results["mgda_sharded"][0], results["mgda_allgather"][0]
    for a, b in zip(trajectory(sharded), trajectory(allgather), strict=True):
        assert_close(a, b)
    for step_a, step_b in zip(sharded["buckets"], allgather["buckets"], strict=True):
        assert step_a.keys() == step_b.keys()
        for i in step_a:
            torch.testing.assert_close(step_a[i].weights, step_b[i].weights, rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(step_a[i].param_grams, step_b[i].param_grams, rtol=1e-6, atol=1e-9)


@pytest.mark.timeout(300)
def test_cpu_offload_goes_through_the_same_hook(runs):
    """FSDP2's CPUOffloadPolicy moves the reduced shard to the host after the reduce-scatter: the
    same buckets and weights, the same parameters bit for bit."""
    _, results = runs
    offload, plain = results["mgda_offload"][0], results["mgda_sharded"][0]
    for a, b in zip(trajectory(offload), trajectory(plain), strict=True):
        assert all(torch.equal(a[n], b[n]) for n in PARAM_NAMES)
    for step_a, step_b in zip(offload["buckets"], plain["buckets"], strict=True):
        assert all(torch.equal(step_a[i].weights, step_b[i].weights) for i in step_b)


@pytest.mark.timeout(300)
def test_accumulation_solves_the_accumulated_gradients(runs):
    """accumulate_grad_batches=2: the first micro-batch skips the reduce-scatter, so each step's
    buckets are solved once, on each language's gradient averaged over its two micro-batches."""
    _, results = runs
    result = results["mgda_accumulate"]
    assert_ranks_identical(result)

    def accumulated(theta, step):
        pairs = [(language_grads(theta, t, 2 * step), language_grads(theta, t, 2 * step + 1)) for t in range(2)]
        return [{n: (a[n] + b[n]) / 2 for n in a} for a, b in pairs]

    check_min_norm_per_bucket(result[0], accumulated, 2)


@pytest.mark.timeout(300)
def test_checkpoint_resumes_parameters_optimizer_and_solver_state(runs):
    """A run checkpointed after 2 steps (FSDP's sharded checkpoint) and resumed equals the straight
    run bit for bit, solver state included: Nash-MTL reuses step 0's weights until step 3."""
    _, results = runs
    assert_resumed_equals_straight(results["straight"], results["resumed"])


@pytest.mark.timeout(300)
def test_conflict_monitor_logs_the_fsdp_buckets(runs):
    """ConflictMonitor reads BucketMOOFSDPStrategy.buckets: its logged cosines are the autograd ones."""
    out, results = runs
    result = results["mgda_sharded"][0]
    (events,) = (out / "mgda_sharded").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
    acc.Reload()
    for step, buckets in enumerate(result["buckets"]):
        grads = per_language(2)(trajectory(result)[step], step)
        groups = {"global": PARAM_NAMES, **{f"bucket_{i}": [p.name for p in b.params] for i, b in buckets.items()}}
        for group, names in groups.items():
            g = [torch.cat([gr[n].reshape(-1) for n in names]) for gr in grads]
            (logged,) = [e.value for e in acc.Scalars(f"conflict/{group}/cosine_mean") if e.step == step]
            assert logged == pytest.approx(float(cosine_similarity(g[0], g[1], dim=0)), abs=1e-5), (group, step)


@pytest.mark.timeout(300)
def test_refuses_before_the_first_step(runs):
    _, results = runs
    for name, (_, message) in ERRORS.items():
        for rank in range(2):
            error = results[name][rank]["error"]
            assert error is not None and message in error, (name, error)
            assert results[name][rank]["snapshots"] == [], f"{name}: a step ran before the refusal"


@pytest.mark.timeout(300)
def test_cli_trains_the_demo_config_with_bucket_mgda(tmp_path):
    """``lightning-moo fit --config configs/demo_fsdp.yaml`` (2 languages, 3 steps, smaller model):
    every language's loss falls, the strategy's buckets are the configured units with parameter
    names and element ranges that tile the model, and ConflictMonitor logs each bucket."""
    config = yaml.safe_load((REPO / "configs" / "demo_fsdp.yaml").read_text())
    assert config["strategy"]["class_path"] == "lightning_moo.strategies.BucketMOOFSDPStrategy"
    saved = tmp_path / "buckets.pt"
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("ConflictMonitor"):
            callback["init_args"]["log_every_n_steps"] = 1
    callbacks = config["trainer"]["callbacks"] + [{"class_path": "fsdp_worker.SaveBuckets", "init_args": {"path": str(saved)}}]
    logs = tmp_path / "logs"
    cli("fit", "--config", str(REPO / "configs" / "demo_fsdp.yaml"), "--trainer.devices=2", "--trainer.max_steps=3",
        "--trainer.val_check_interval=3", "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={logs}",
        f"--trainer.callbacks={yaml.safe_dump(callbacks)}", "--data.train_languages=[deu, rus]",
        "--data.max_length=48", "--data.batch_size=4", "--data.max_eval_examples=8", "--model.warmup_steps=0")
    record = torch.load(saved, weights_only=False)
    buckets, names = record["buckets"], record["names"]
    # 2 layers × (attention, MLP), then the rest of the model.
    assert len(buckets) == 5
    assert sorted(p.name for b in buckets.values() for p in b.params) == sorted(names)
    for b in buckets.values():
        assert all(p.end - p.start > 0 for p in b.params) and b.params[-1].end == b.numel, b.params
        assert b.weights.shape == (2,) and abs(float(b.weights.sum()) - 1) < 1e-9 and (b.weights >= 0).all()
    mlp = [b for b in buckets.values() if all(".mlp." in p.name for p in b.params)]
    attention = [b for b in buckets.values() if all(".self_attn." in p.name for p in b.params)]
    assert len(mlp) == 2 and len(attention) == 2
    logged = scalars(logs / "tensorboard" / "version_0")
    for i in buckets:
        assert sorted(logged[f"conflict/bucket_{i}/cosine_mean"]) == [0, 1, 2]
    for language in ("deu", "rus"):
        losses = logged[f"train/loss_{language}"]
        assert np.isfinite(list(losses.values())).all() and losses[2] < losses[0], (language, losses)
    # lightning-moo export consolidates FSDP's sharded checkpoint into the trained weights.
    from safetensors.torch import load_file

    checkpoint = logs / "tensorboard" / "version_0" / "checkpoints" / "last.ckpt"
    cli("export", "--config", str(REPO / "configs" / "demo_fsdp.yaml"), "--ckpt_path", str(checkpoint), "--out", str(tmp_path / "hf"))
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    trained = {n.removeprefix("model."): w for n, w in record["weights"].items()}
    assert exported.keys() == trained.keys()
    for name, weight in trained.items():
        assert torch.equal(exported[name], weight), name
