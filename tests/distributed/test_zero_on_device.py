"""The solve-on-device path of BucketMOOStrategy (Mean, MGDA, MGDA-l2, CAGrad): what CUDA uses so
that no bucket waits for the host, forced on CPU with ``on_device=True`` and proved against the host
path and plain autograd (2 gloo ranks, the toy problem of ``toy.py``)."""

from __future__ import annotations

import pytest
import torch
from checks import assert_close, assert_ranks_identical, language_grads
from launch import run_ranks

from lightning_moo.solvers import MGDA

LR = 0.1
BUCKET = 600  # three buckets per step, see test_bucket_moo.py


def solver(name: str, **init_args) -> dict:
    return {"class_path": f"lightning_moo.solvers.{name}", "init_args": init_args}


def trajectory(result: dict) -> list[dict[str, torch.Tensor]]:
    return result["snapshots"] + [result["params"]]


@pytest.mark.timeout(400)
def test_device_path_trains_what_the_host_path_trains(tmp_path):
    common = dict(stage=2, steps=3, lr=LR, reduce_bucket_size=BUCKET)
    runs = [
        dict(name="stock", strategy="stock", optimizer="adam", lr=0.01, steps=3, reduce_bucket_size=BUCKET),
        dict(name="mean_device", solver=solver("Mean"), on_device=True, optimizer="adam", lr=0.01, steps=3, reduce_bucket_size=BUCKET),
        dict(name="mgda_host", solver=solver("MGDA"), on_device=False, **common),
        dict(name="mgda_device", solver=solver("MGDA"), on_device=True, **common),
        dict(name="l2_host", solver=solver("MGDA", normalization="l2"), on_device=False, **common),
        dict(name="l2_device", solver=solver("MGDA", normalization="l2"), on_device=True, **common),
        dict(name="cagrad_host", solver=solver("CAGrad", c=0.4), on_device=False, **common),
        dict(name="cagrad_device", solver=solver("CAGrad", c=0.4), on_device=True, **common),
        # Four languages on two ranks (two stashed per rank): T = 4 for the enumeration.
        dict(name="m2_host", solver=solver("MGDA"), languages=4, languages_per_rank=2, on_device=False, **common),
        dict(name="m2_device", solver=solver("MGDA"), languages=4, languages_per_rank=2, on_device=True, **common),
        dict(name="nan_device", solver=solver("MGDA"), on_device=True, nan_at=[1, 1], steps=3, expect_error=True),
    ]
    res = run_ranks(runs, tmp_path)
    for name in ("mean_device", "mgda_device", "l2_device", "cagrad_device", "m2_device"):
        assert_ranks_identical(res[name])
    # Mean on the device is stock DeepSpeed bit for bit (weights exactly 1/2, the same combination).
    for name, p in res["stock"][0]["params"].items():
        assert torch.equal(res["mean_device"][0]["params"][name], p), name
    for host, device in (("mgda_host", "mgda_device"), ("l2_host", "l2_device"), ("cagrad_host", "cagrad_device"),
                         ("m2_host", "m2_device")):
        for a, b in zip(trajectory(res[host][0]), trajectory(res[device][0])):
            assert_close(a, b)
        for step_h, step_d in zip(res[host][0]["buckets"], res[device][0]["buckets"]):
            assert sorted(step_h) == sorted(step_d) and len(step_d) == 3
            for i, b in step_d.items():
                assert b.gram.device.type == "cpu" and b.weights.device.type == "cpu"  # moved after the backward
                torch.testing.assert_close(b.param_grams, step_h[i].param_grams, rtol=1e-6, atol=1e-9)
                g = b.gram
                d_dev, d_host = b.weights @ g @ b.weights, step_h[i].weights @ g @ step_h[i].weights
                torch.testing.assert_close(d_dev, d_host, rtol=1e-6, atol=1e-12)  # the same direction's norm
    # Per bucket, the applied update is MGDA of plain-autograd per-language gradients (as the host proof).
    thetas = trajectory(res["mgda_device"][0])
    for step, buckets in enumerate(res["mgda_device"][0]["buckets"]):
        grads = [language_grads(thetas[step], t, step) for t in range(2)]
        for b in buckets.values():
            names = [p.name for p in b.params]
            flat = lambda d: torch.cat([d[n].reshape(-1) for n in names]).double()  # noqa: E731
            g = torch.stack([flat(gr) for gr in grads])
            theta = flat(thetas[step])
            d = (theta - flat(thetas[step + 1])) / LR
            atol = 4 * torch.finfo(torch.float32).eps * theta.abs().max().item() / LR
            torch.testing.assert_close(d, MGDA()(g @ g.T) @ g, rtol=1e-4, atol=atol)
    # A non-finite gradient still stops training before the step, on every rank, naming it.
    for rank in range(2):
        error = res["nan_device"][rank]["error"]
        assert error is not None and "non-finite gradient in ZeRO bucket 0 at step 1" in error, error
        assert "language 1: net.4.bias" in error and "language 0" not in error
