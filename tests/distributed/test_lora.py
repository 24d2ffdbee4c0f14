"""LoRA under bucket-level MOO (2 gloo ranks, CPU): the toy net's linear layers frozen, peft's rank-2
adapters on them. Only adapter parameters form buckets; ``Mean`` trains what stock DeepSpeed and
stock DDP train; per bucket, MGDA's update is MGDA of the plain-autograd per-language gradients of
that bucket's adapter parameters; ``target_buckets`` sizes the buckets and too few are warned about.
"""

from __future__ import annotations

import re
from pathlib import Path

import launch
import pytest
import torch
from checks import assert_mgda_per_bucket, assert_ranks_identical, language_grads
from test_bucket_moo import trajectory
from toy import make_net

T, LR = 2, 0.1
NET = make_net(lora=True)
ADAPTER = [f"net.{n}" for n, p in NET.named_parameters() if p.requires_grad]
FROZEN = [f"net.{n}" for n, p in NET.named_parameters() if not p.requires_grad]
ADAPTER_NUMEL = sum(p.numel() for p in NET.parameters() if p.requires_grad)
TARGET = 4
MEAN, MGDA = {"class_path": "lightning_moo.solvers.Mean"}, {"class_path": "lightning_moo.solvers.MGDA"}


def test_the_toy_adapter_is_small_and_the_base_frozen():
    assert ADAPTER and FROZEN and all(".lora_" in n for n in ADAPTER)
    assert ADAPTER_NUMEL == 280 and sum(p.numel() for p in NET.parameters()) == 1476 + 280


def launch_ranks(runs: list[dict], out: Path, worker: str = "worker.py") -> dict[str, list[dict]]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(launch, "WORKER", Path(__file__).with_name(worker))
        return launch.run_ranks(runs, out, world_size=T, timeout=240)


@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_deepspeed")
    common = dict(lora=True, stage=2, steps=3)
    adam = dict(optimizer="adam", lr=0.01, reduce_bucket_size=100, **common)
    runs = [
        dict(name="stock", strategy="stock", **adam),
        dict(name="mean", solver=MEAN, **adam),
        dict(name="mgda", solver=MGDA, lr=LR, target_buckets=TARGET, **common),
        # Four languages on two ranks: each rank stashes one adapter gradient.
        dict(name="mgda_two_per_rank", solver=MGDA, lr=LR, target_buckets=TARGET, languages=4, languages_per_rank=2, **common),
        dict(name="mgda_resumed", solver=MGDA, lr=LR, target_buckets=TARGET, resume_at=1, **common),
        # The worker's default reduce_bucket_size holds every adapter gradient: one bucket, warned about.
        dict(name="one_bucket", solver=MGDA, lr=LR, lora=True, steps=2),
    ]
    return launch_ranks(runs, out), (out / "rank0.log").read_text()


@pytest.mark.timeout(300)
def test_mean_with_lora_reproduces_stock_deepspeed(deepspeed_runs):
    res, _ = deepspeed_runs
    assert_ranks_identical(res["mean"])
    for a, b in zip(trajectory(res["mean"][0]), trajectory(res["stock"][0])):
        for name in ADAPTER + FROZEN:
            assert torch.equal(a[name], b[name]), name
    first, last = res["stock"][0]["snapshots"][0], res["stock"][0]["params"]
    assert all(not torch.equal(first[n], last[n]) for n in ADAPTER), "an adapter weight did not train"
    assert all(torch.equal(first[n], last[n]) for n in FROZEN), "a frozen weight moved"
    # Only adapter parameters reached the hook.
    assert {p.name for step in res["mean"][0]["buckets"] for b in step.values() for p in b.params} == set(ADAPTER)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name, languages", [("mgda", 2), ("mgda_two_per_rank", 4)])
def test_mgda_per_bucket_on_adapter_parameters_equals_autograd(deepspeed_runs, name, languages):
    res, _ = deepspeed_runs
    result = res[name]
    assert_ranks_identical(result)
    thetas = trajectory(result[0])
    buckets = result[0]["buckets"]
    count = len(buckets[0])
    for step in buckets:
        assert sorted(p.name for b in step.values() for p in b.params) == sorted(ADAPTER), "buckets must tile the adapter"
        # target_buckets: buckets of at most ceil(numel / target) elements (no adapter weight is larger).
        assert all(b.numel <= -(-ADAPTER_NUMEL // TARGET) for b in step.values())
    assert count >= TARGET
    assert_mgda_per_bucket(thetas, buckets, lambda s: [language_grads(thetas[s], t, s, lora=True) for t in range(languages)],
                           lr=LR, buckets_per_step=count)
    assert all(torch.equal(thetas[0][n], thetas[-1][n]) for n in FROZEN)


@pytest.mark.timeout(300)
def test_lora_checkpoint_resumes_exactly(deepspeed_runs):
    res, _ = deepspeed_runs
    for name, p in res["mgda"][0]["params"].items():
        assert torch.equal(res["mgda_resumed"][0]["params"][name], p), name


@pytest.mark.timeout(300)
def test_few_buckets_are_warned_about_once(deepspeed_runs):
    res, log = deepspeed_runs
    assert len(res["one_bucket"][0]["buckets"][0]) == 1
    # One warning, from the one-bucket run only (the target_buckets runs formed enough buckets).
    assert re.findall(r"bucket-level MOO ran on (\d+) bucket\(s\)", log) == ["1"], log[-3000:]
    assert "strategy.target_buckets" in log


@pytest.mark.timeout(300)
def test_lora_under_ddp(tmp_path):
    """Stock DDP and Mean through the comm hook agree bit for bit on the adapter; MGDA per DDP bucket
    equals autograd's per-language adapter gradients, with the buckets target_buckets sized."""
    common = dict(lora=True, steps=3, ddp={"find_unused_parameters": True})
    runs = [
        dict(name="stock", strategy="ddp_stock", optimizer="adam", lr=0.01, **common),
        dict(name="mean", strategy="ddp", solver=MEAN, optimizer="adam", lr=0.01, **common),
        dict(name="mgda", strategy="ddp", solver=MGDA, lr=LR, target_buckets=TARGET, **common),
    ]
    res = launch_ranks(runs, tmp_path, "ddp_worker.py")
    for a, b in zip(trajectory(res["mean"][0]), trajectory(res["stock"][0])):
        for name in ADAPTER + FROZEN:
            assert torch.equal(a[name], b[name]), name
    result = res["mgda"]
    assert_ranks_identical(result)
    thetas, buckets = trajectory(result[0]), result[0]["buckets"]
    assert len(buckets[0]) > 1, "one DDP bucket would not prove per-bucket MOO"
    assert_mgda_per_bucket(thetas, buckets, lambda s: [language_grads(thetas[s], t, s, lora=True) for t in range(T)],
                           lr=LR, buckets_per_step=len(buckets[0]))
