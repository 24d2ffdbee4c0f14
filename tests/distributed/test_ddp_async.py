"""BucketMOODDPStrategy's hook hands the buckets to a worker thread and returns at once: it must train
exactly what reducing every bucket inside the hook trains (2 and 3 gloo ranks, CPU).

This file is also the ranks' worker: ``ddp_worker.py``'s runs, plus ``synchronous: true`` for the
reference, a hook that reduces the bucket before it returns (``DDPBucketHook.reduce``, called
directly, as the hook did before it overlapped with the backward).
"""

# No ``from __future__ import annotations``: DDP checks the comm hook's annotations against the real types.

import json
import threading
from pathlib import Path

import launch
import pytest
import torch
import torch.distributed as dist
from test_bucket_moo import trajectory

from lightning_moo.strategies import BucketMOODDPStrategy, ddp

BUCKET_MB = 600 * 4 / 2**20  # 600 fp32 elements: several buckets of the toy's 1,476 parameters
MGDA_SPEC = {"class_path": "lightning_moo.solvers.MGDA"}
NASH_SPEC = {"class_path": "lightning_moo.solvers.NashMTL", "init_args": {"update_weights_every": 2}}
# Each case runs with the worker thread and with the synchronous reference.
CASES = {
    "mgda": dict(solver=MGDA_SPEC, ddp=dict(bucket_cap_mb=BUCKET_MB)),
    # DDP all-reduces its used-parameter map on the default group from the backward's thread while
    # the worker thread reduces buckets: the worker's own group keeps the two apart.
    "nash_unused": dict(solver=NASH_SPEC, optimizer="adam", lr=0.01, ddp=dict(bucket_cap_mb=BUCKET_MB, find_unused_parameters=True)),
    "mgda_static_graph": dict(solver=MGDA_SPEC, ddp=dict(bucket_cap_mb=BUCKET_MB, static_graph=True, gradient_as_bucket_view=True)),
    "mgda_allgather": dict(solver=MGDA_SPEC, exchange="allgather", ddp=dict(bucket_cap_mb=BUCKET_MB)),
    "mgda_accumulate": dict(solver=MGDA_SPEC, accumulate=2, ddp=dict(bucket_cap_mb=BUCKET_MB)),
    # Language 1's loss is NaN at step 1: every rank must raise the FloatingPointError, and not hang.
    "nan": dict(solver=MGDA_SPEC, nan_at=[1, 1], expect_error=True, ddp=dict(bucket_cap_mb=BUCKET_MB)),
}


def _reduce_in_hook(state: ddp.DDPBucketHook, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    future.set_result(state.reduce(bucket))
    return future


class SynchronousHook(BucketMOODDPStrategy):
    """The strategy with the reference hook (its worker thread starts, but is handed nothing)."""

    def _register_ddp_hooks(self) -> None:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(ddp, "_moo_comm_hook", _reduce_in_hook)
            super()._register_ddp_hooks()


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"{n}_ranks")
def runs(request, tmp_path_factory):
    specs = [
        dict(name=f"{name}_{kind}", steps=4, synchronous=kind == "sync", **case)
        for name, case in CASES.items() for kind in ("async", "sync")
    ]
    out = tmp_path_factory.mktemp(f"ddp_async_{request.param}")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(launch, "WORKER", Path(__file__))
        results = launch.run_ranks(specs, out, world_size=request.param, timeout=240)
    threads = {path.name: json.loads(path.read_text()) for path in out.glob("*_threads.json")}
    assert len(threads) == len(specs) * request.param
    return results, threads


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", [name for name in CASES if name != "nan"])
def test_worker_thread_trains_what_the_synchronous_hook_trains(runs, name):
    results, _ = runs
    for a, b in zip(results[f"{name}_async"], results[f"{name}_sync"], strict=True):  # every rank
        assert a["error"] is None and b["error"] is None, (a["error"], b["error"])
        assert len(a["buckets"]) == 4 and len(a["buckets"][-1]) > 1, "one bucket only: nothing to overlap"
        for theta_a, theta_b in zip(trajectory(a), trajectory(b), strict=True):
            for param, value in theta_a.items():
                assert torch.equal(value, theta_b[param]), param
        for step_a, step_b in zip(a["buckets"], b["buckets"], strict=True):
            assert step_a.keys() == step_b.keys()
            for i, info in step_a.items():
                assert torch.equal(info.weights, step_b[i].weights) and torch.equal(info.param_grams, step_b[i].param_grams)


@pytest.mark.timeout(300)
def test_non_finite_gradient_raises_the_same_error_on_every_rank(runs):
    results, _ = runs
    for a, b in zip(results["nan_async"], results["nan_sync"], strict=True):
        assert a["error"] == b["error"], (a["error"], b["error"])
        assert a["error"].startswith("FloatingPointError: non-finite gradient in DDP bucket"), a["error"]
        assert "at step 1" in a["error"] and "language 1: net.4.bias" in a["error"], a["error"]
        for theta_a, theta_b in zip(trajectory(a), trajectory(b), strict=True):  # step 1 did not update
            for param, value in theta_a.items():
                assert torch.equal(value, theta_b[param]), param


@pytest.mark.timeout(300)
def test_worker_threads_end_with_their_fit(runs):
    _, threads = runs
    assert all(alive == [] for alive in threads.values()), threads


if __name__ == "__main__":
    import ddp_worker
    import worker

    def make_strategy(spec: dict):
        with pytest.MonkeyPatch.context() as patch:
            if spec.get("synchronous"):
                patch.setattr(ddp_worker, "BucketMOODDPStrategy", SynchronousHook)
            return ddp_worker.make_strategy(spec)

    def run(spec: dict, rank: int, world: int, out: str) -> bool:
        ok = run_one(spec, rank, world, out)
        alive = [t.name for t in threading.enumerate() if t.name.startswith("lightning-moo")]
        Path(out, f"{spec['name']}_rank{rank}_threads.json").write_text(json.dumps(alive))
        return ok

    run_one, worker.make_strategy, worker.run = worker.run, make_strategy, run
    worker.main()
