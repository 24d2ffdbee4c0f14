"""Proofs that bucket-level MOO inside DeepSpeed ZeRO computes what it claims (2 gloo ranks, CPU).

Every run trains the toy problem of ``toy.py`` (1,476 parameters) with rank t on language t; the
reference values come from stock DeepSpeed in the same processes or from plain autograd here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from checks import assert_close, assert_ranks_identical, assert_resumed_equals_straight, language_grads, load, single_language_sgd
from launch import run_ranks
from toy import make_net

from lightning_moo.solvers import MGDA

T = 2
LR = 0.1
# With the toy net this gives three buckets in backward order: [net.4.*, net.2.bias],
# [net.2.weight] (1,024 elements: larger than a bucket, so DeepSpeed reduces it alone), [net.0.*].
BUCKET = 600


def solver(name: str, module: str = "lightning_moo.solvers", **init_args) -> dict:
    return {"class_path": f"{module}.{name}", "init_args": init_args}


def update_atol(theta: torch.Tensor) -> float:
    """What fp32 parameters blur in a direction recovered as (θ_s - θ_s+1) / LR."""
    return 4 * torch.finfo(torch.float32).eps * theta.abs().max().item() / LR


def trajectory(result: dict) -> list[dict[str, torch.Tensor]]:
    """Parameters before each step, then after the last one."""
    return result["snapshots"] + [result["params"]]


@pytest.mark.timeout(300)
def test_mean_reproduces_stock_deepspeed(tmp_path):
    """Proof 1: Mean through the hook gives stock DeepSpeed's parameters bit for bit (fp32 and bf16)."""
    runs, pairs = [], []
    for stage in (1, 2):
        for overlap in (False, True):
            common = dict(stage=stage, overlap_comm=overlap, optimizer="adam", lr=0.01, steps=4, reduce_bucket_size=BUCKET)
            tag = f"s{stage}_overlap{int(overlap)}"
            runs += [dict(name=f"stock_{tag}", strategy="stock", **common), dict(name=f"mean_{tag}", solver=solver("Mean"), **common)]
            pairs.append((f"stock_{tag}", f"mean_{tag}"))
    common = dict(stage=2, optimizer="adam", lr=0.01, steps=4, reduce_bucket_size=BUCKET)
    runs.append(dict(name="mean_allgather", solver=solver("Mean"), exchange="allgather", **common))
    pairs.append(("stock_s2_overlap1", "mean_allgather"))
    # bf16: ZeRO-2 with fp32 gradient accumulation (DeepSpeed's separate fp32 gradient partition),
    # and ZeRO-1 accumulating in bf16.
    for stage, accum in ((2, "fp32"), (1, "bf16")):
        config = {
            "zero_optimization": {"stage": stage, "contiguous_gradients": True, "overlap_comm": True, "reduce_bucket_size": BUCKET},
            "data_types": {"grad_accum_dtype": accum},
            "train_micro_batch_size_per_gpu": 1,
            "zero_allow_untested_optimizer": True,
        }
        common = dict(config=config, precision="bf16-mixed", optimizer="adam", lr=0.01, steps=3)
        tag = f"bf16_s{stage}_{accum}"
        runs += [dict(name=f"stock_{tag}", strategy="stock", **common), dict(name=f"mean_{tag}", solver=solver("Mean"), **common)]
        pairs.append((f"stock_{tag}", f"mean_{tag}"))
    res = run_ranks(runs, tmp_path)
    for stock, moo in pairs:
        assert_ranks_identical(res[moo])
        # The hook really ran: every step reduced its buckets through the solver.
        steps = res[moo][0]["buckets"]
        assert len(steps) == len(res[moo][0]["snapshots"]) and all(steps)
        assert all(b.weights.tolist() == [0.5, 0.5] for step in steps for b in step.values())
        for name, p in res[stock][0]["params"].items():
            assert not torch.equal(p, res[stock][0]["snapshots"][0][name]), f"{stock}: {name} did not train"
            assert torch.equal(res[moo][0]["params"][name], p), f"{moo} differs from {stock} in {name}"


@pytest.mark.timeout(300)
def test_one_hot_reproduces_single_language_training(tmp_path):
    """Proof 2: all weight on language k trains exactly what plain SGD on language k trains;
    DeepSpeed's gradient clipping then clips that language's gradient, as torch's clip_grad_norm_."""
    one_hot = lambda k: solver("OneHot", "toy_solvers", language=k)  # noqa: E731
    runs = [
        dict(name="onehot1_s2", solver=one_hot(1), stage=2, steps=3, reduce_bucket_size=BUCKET),
        dict(name="onehot0_s1", solver=one_hot(0), stage=1, overlap_comm=False, exchange="allgather", steps=3, reduce_bucket_size=BUCKET),
        dict(name="onehot1_clip", solver=one_hot(1), stage=2, steps=3, reduce_bucket_size=BUCKET, clip=0.05),
    ]
    res = run_ranks(runs, tmp_path)
    for name, k, clip in (("onehot1_s2", 1, None), ("onehot0_s1", 0, None), ("onehot1_clip", 1, 0.05)):
        assert_ranks_identical(res[name])
        assert_close(res[name][0]["params"], single_language_sgd(k, steps=3, lr=LR, clip=clip))
    # The clip was active: clipped and unclipped training differ.
    unclipped, clipped = single_language_sgd(1, steps=3, lr=LR), single_language_sgd(1, steps=3, lr=LR, clip=0.05)
    assert any(not torch.allclose(unclipped[n], clipped[n]) for n in clipped)


@pytest.fixture(scope="module")
def moo_runs(tmp_path_factory):
    """MGDA, CAGrad and PCGrad through both exchanges, and MGDA in both global modes (one launch)."""
    common = dict(stage=2, steps=3, lr=LR, reduce_bucket_size=BUCKET)
    runs = [dict(name=f"{s}_{x}", solver=solver(s), exchange=x, **common) for s in ("MGDA", "CAGrad", "PCGrad") for x in ("sharded", "allgather")]
    runs += [
        dict(name="global", solver=solver("MGDA"), mode="global", exchange="allgather", **common),
        dict(name="global_two_pass", solver=solver("MGDA"), mode="global_two_pass", **common),
        # Sener & Koltun's loss+ normalization: the strategy must hand the solver every language's loss.
        dict(name="MGDA_loss_plus_raw", solver=solver("MGDA", normalization="loss+", apply_to="raw"), **common),
    ]
    return run_ranks(runs, tmp_path_factory.mktemp("moo"))


@pytest.mark.timeout(400)
@pytest.mark.parametrize("name", ["MGDA", "CAGrad", "PCGrad"])
def test_sharded_equals_allgather(moo_runs, name):
    """Proof 3 (and 6): the sharded exchange trains what the all-gather reference trains."""
    sharded, allgather = moo_runs[f"{name}_sharded"], moo_runs[f"{name}_allgather"]
    assert_ranks_identical(sharded)
    assert_ranks_identical(allgather)
    for a, b in zip(trajectory(sharded[0]), trajectory(allgather[0])):
        assert_close(a, b)
    for step_a, step_b in zip(sharded[0]["buckets"], allgather[0]["buckets"]):
        for i in step_a:
            torch.testing.assert_close(step_a[i].weights, step_b[i].weights, rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(step_a[i].param_grams, step_b[i].param_grams, rtol=1e-6, atol=1e-9)


def _buckets_follow_reduce_bucket_size(buckets, sizes: dict[str, int]) -> None:
    """DeepSpeed's rule, checked from the outside: parameters in backward order, every one exactly
    once, a bucket closes when the next parameter would overflow it, a larger parameter goes alone."""
    order = [p.name for b in buckets for p in b.params]
    assert order == list(reversed(list(sizes))), order
    for b, nxt in zip(buckets, buckets[1:] + [None]):
        total = sum(sizes[p.name] for p in b.params)
        assert total <= BUCKET or len(b.params) == 1, f"bucket {b.index} holds {total} > {BUCKET} elements"
        assert b.numel == total
        if nxt is not None and total <= BUCKET:
            assert total + sizes[nxt.params[0].name] > BUCKET or sizes[nxt.params[0].name] > BUCKET


@pytest.mark.timeout(400)
def test_mgda_per_bucket_direction_does_not_conflict(moo_runs):
    """Proof 4: against per-language gradients from plain autograd, every bucket's applied MGDA
    direction d_b satisfies <d_b, g_tb> >= |d_b|^2 >= 0 for every language t, and is MGDA of that
    bucket's own Gram matrix; the buckets are the ones reduce_bucket_size implies."""
    result = moo_runs["MGDA_sharded"][0]
    sizes = {n: p.numel() for n, p in load(make_net(), result["params"]).named_parameters()}
    sizes = {f"net.{n}": v for n, v in sizes.items()}
    thetas = trajectory(result)
    conflicts = 0
    for step, buckets in enumerate(result["buckets"]):
        buckets = [buckets[i] for i in sorted(buckets)]
        assert len(buckets) == 3
        _buckets_follow_reduce_bucket_size(buckets, sizes)
        grads = [language_grads(thetas[step], t, step) for t in range(T)]
        for b in buckets:
            names = [p.name for p in b.params]
            flat = lambda d: torch.cat([d[n].reshape(-1) for n in names]).double()  # noqa: E731
            g = torch.stack([flat(gr) for gr in grads])
            d = (flat(thetas[step]) - flat(thetas[step + 1])) / LR
            expected = MGDA()(g @ g.T) @ g
            torch.testing.assert_close(d, expected, rtol=1e-4, atol=update_atol(flat(thetas[step])))
            torch.testing.assert_close(b.gram, g @ g.T, rtol=1e-5, atol=1e-9)
            # One Gram per parameter of the bucket (what monitoring splits by layer and kind).
            for p, pg in zip(b.params, b.param_grams):
                gp = torch.stack([gr[p.name].reshape(-1) for gr in grads]).double()
                torch.testing.assert_close(pg, gp @ gp.T, rtol=1e-5, atol=1e-9)
            for t in range(T):
                assert g[t] @ d >= (1 - 1e-3) * (d @ d), f"step {step} bucket {b.index}: d conflicts with language {t}"
            conflicts += int((g[0] @ g[1]) < 0)
    assert conflicts > 0, "the toy languages never conflicted: the test would prove nothing"


@pytest.mark.timeout(400)
def test_mgda_loss_plus_gets_each_languages_loss_per_bucket(moo_runs):
    """MGDA(normalization="loss+", apply_to="raw") per bucket is Sener & Koltun's procedure on that
    bucket's autograd gradients, with n_t = L_t ‖g_t,b‖ from the losses recomputed here: the
    strategy gathered each language's loss of the step and handed it to the solver."""
    from test_mgda_normalizations import sener_koltun

    from toy import loss_fn

    result = moo_runs["MGDA_loss_plus_raw"][0]
    assert_ranks_identical(moo_runs["MGDA_loss_plus_raw"])
    thetas = trajectory(result)
    for step, buckets in enumerate(result["buckets"]):
        grads = [language_grads(thetas[step], t, step) for t in range(T)]
        losses = np.array([float(loss_fn(load(make_net(), thetas[step]), t, step)) for t in range(T)])
        for b in buckets.values():
            names = [p.name for p in b.params]
            flat = lambda d: torch.cat([d[n].reshape(-1) for n in names]).double()  # noqa: E731
            g = torch.stack([flat(gr) for gr in grads])
            d = (flat(thetas[step]) - flat(thetas[step + 1])) / LR
            expected = torch.from_numpy(sener_koltun(g.numpy(), losses, "loss+", "raw"))
            torch.testing.assert_close(d, expected, rtol=1e-4, atol=update_atol(flat(thetas[step])))


@pytest.mark.timeout(400)
def test_global_mode_is_offline_mgda_and_two_pass_matches(moo_runs):
    """Proof 5: mode='global' applies MGDA of the concatenated full gradients (recomputed here),
    and 'global_two_pass' reaches the same parameters."""
    glob = moo_runs["global"]
    assert_ranks_identical(glob)
    assert_ranks_identical(moo_runs["global_two_pass"])
    thetas = trajectory(glob[0])
    for step, buckets in enumerate(glob[0]["buckets"]):
        assert list(buckets) == [0] and buckets[0].numel == sum(p.numel() for p in thetas[0].values())
        grads = [language_grads(thetas[step], t, step) for t in range(T)]
        g = torch.stack([torch.cat([gr[n].reshape(-1) for n in thetas[0]]) for gr in grads]).double()
        w = MGDA()(g @ g.T)
        expected = {n: (thetas[step][n] - LR * sum(w[t] * grads[t][n].double() for t in range(T))).float() for n in thetas[0]}
        assert_close(thetas[step + 1], expected)
    for a, b in zip(trajectory(moo_runs["global_two_pass"][0]), thetas):
        assert_close(a, b)


@pytest.mark.timeout(300)
def test_refuses_what_the_hook_cannot_serve(tmp_path):
    """Clear, early errors instead of silently averaging or hanging."""
    mgda = solver("MGDA")
    zero1_bf16 = {
        "zero_optimization": {"stage": 1, "contiguous_gradients": True},
        "data_types": {"grad_accum_dtype": "fp32"},
        "train_micro_batch_size_per_gpu": 1,
        "zero_allow_untested_optimizer": True,
    }
    cases = {
        "no_contiguous": (dict(contiguous_gradients=False), "contiguous_gradients=true"),
        "no_zero": (dict(stage=0), "needs ZeRO stage 1, 2 or 3 (got stage 0)"),
        "languages": (dict(languages=3), "3 languages do not split over world size 2"),
        "accumulation": (dict(accumulate=2), "ZeRO-2 reduces every micro-batch"),
        "zero1_bf16": (dict(config=zero1_bf16, precision="bf16-mixed"), "ZeRO stage 1 with bf16 and fp32 gradient accumulation"),
        # Last: the error is raised inside a backward pass.
        "nan": (dict(nan_at=[1, 1]), "non-finite gradient in ZeRO bucket 0 at step 1"),
    }
    runs = [dict(name=name, solver=mgda, steps=3, expect_error=True, **spec) for name, (spec, _) in cases.items()]
    res = run_ranks(runs, tmp_path)
    for name, (_, message) in cases.items():
        for rank in range(T):
            assert res[name][rank]["error"] is not None and message in res[name][rank]["error"], (name, res[name][rank]["error"])
    assert "language 1: net.4.bias" in res["nan"][0]["error"] and "language 0" not in res["nan"][0]["error"]


@pytest.mark.timeout(300)
def test_linear_solver_under_zero2_accumulation_matches_stock(tmp_path):
    """ZeRO-2 reduces each micro-batch; for Mean that is still the average of the accumulated gradients."""
    common = dict(stage=2, accumulate=2, optimizer="adam", lr=0.01, steps=2, reduce_bucket_size=BUCKET)
    res = run_ranks([dict(name="stock", strategy="stock", **common), dict(name="mean", solver=solver("Mean"), **common)], tmp_path)
    assert_ranks_identical(res["mean"])
    for name, p in res["stock"][0]["params"].items():
        assert torch.equal(res["mean"][0]["params"][name], p), name


@pytest.mark.timeout(300)
def test_checkpoint_resumes_parameters_optimizer_and_solver_state(tmp_path):
    """A run checkpointed after 2 steps and resumed equals the straight run, solver state included:
    Nash-MTL reuses step 0's weights until step 3, also across the resume."""
    common = dict(solver=solver("NashMTL", update_weights_every=3), optimizer="adam", lr=0.01, steps=4, reduce_bucket_size=BUCKET)
    res = run_ranks([dict(name="straight", **common), dict(name="resumed", resume_at=2, **common)], tmp_path)
    assert_resumed_equals_straight(res["straight"], res["resumed"])


@pytest.mark.timeout(300)
def test_zero1_accumulation_solves_the_accumulated_gradients(tmp_path):
    """ZeRO-1 reduces once per optimizer step, so with accumulate_grad_batches=2 every bucket's
    update is MGDA of each language's gradient averaged over its two micro-batches (plain autograd)."""
    common = dict(solver=solver("MGDA"), stage=1, accumulate=2, steps=2, lr=LR, reduce_bucket_size=BUCKET)
    res = run_ranks([dict(name=f"overlap{int(o)}", overlap_comm=o, **common) for o in (False, True)], tmp_path)
    for name, result in res.items():
        assert_ranks_identical(result)
        thetas = trajectory(result[0])
        for step, buckets in enumerate(result[0]["buckets"]):
            assert len(buckets) == 3, name
            grads = [language_grads(thetas[step], t, 2 * step) for t in range(T)]
            grads2 = [language_grads(thetas[step], t, 2 * step + 1) for t in range(T)]
            for b in buckets.values():
                names = [p.name for p in b.params]
                g = torch.stack([torch.cat([(g1[n] + g2[n]).reshape(-1) / 2 for n in names]) for g1, g2 in zip(grads, grads2)]).double()
                theta = torch.cat([thetas[step][n].reshape(-1) for n in names]).double()
                d = (theta - torch.cat([thetas[step + 1][n].reshape(-1) for n in names]).double()) / LR
                # Lightning divides each micro-batch loss by accumulate_grad_batches and DeepSpeed's
                # engine.backward divides it again (stock behaviour too): the gradient is g / 2.
                expected = MGDA()(g @ g.T) @ g / 2
                torch.testing.assert_close(d, expected, rtol=1e-4, atol=update_atol(theta))


@pytest.mark.timeout(300)
def test_three_ranks(tmp_path):
    """With 3 ranks, slices, ZeRO partitions and buckets all fall differently: sharded still equals
    allgather, and Mean equals stock up to the rounding of 1/3."""
    common = dict(stage=2, steps=3, lr=LR, reduce_bucket_size=BUCKET)
    runs = [
        dict(name="sharded", solver=solver("MGDA"), **common),
        dict(name="allgather", solver=solver("MGDA"), exchange="allgather", **common),
        dict(name="stock", strategy="stock", **common),
        dict(name="mean", solver=solver("Mean"), **common),
    ]
    res = run_ranks(runs, tmp_path, world_size=3)
    for result in res.values():
        assert_ranks_identical(result)
    for a, b in zip(trajectory(res["sharded"][0]), trajectory(res["allgather"][0])):
        assert_close(a, b)
    assert_close(res["mean"][0]["params"], res["stock"][0]["params"])
