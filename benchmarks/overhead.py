"""Overhead of bucket-level MOO against stock DeepSpeed ZeRO-2, measured in the same run.

For an MLP of ~10M parameters on CPU (gloo), 2 and 4 ranks (one language per rank), reports per
configuration: median step time, bytes sent per rank per step, and peak RSS during the timed
steps (Linux VmHWM, reset after warm-up; glibc's mmap threshold fixed at 64 KiB so that freed
buffers are returned), each against stock ZeRO-2 measured in the same invocation. Every
configuration runs in fresh processes.

Bytes sent are counted by wrapping torch.distributed's collectives and charging each call what a
bandwidth-optimal algorithm must send from one rank (n = bytes of the tensor, N = ranks):
all_reduce 2n(N-1)/N, reduce and reduce_scatter n(N-1)/N, broadcast n(N-1)/N, all_gather of an
n-byte input n(N-1), all_to_all the input minus the part kept locally, a batch of point-to-point
operations what its sends carry.

    python benchmarks/overhead.py --ranks 2 4 --out benchmarks/results/overhead.md
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {
    "stock ZeRO-2": dict(strategy="stock"),
    "bucket MGDA allgather": dict(solver="MGDA", exchange="allgather"),
    "bucket MGDA sharded": dict(solver="MGDA", exchange="sharded"),
    "bucket CAGrad sharded": dict(solver="CAGrad", exchange="sharded"),
    "bucket PCGrad sharded": dict(solver="PCGrad", exchange="sharded"),
    "global MGDA (allgather)": dict(solver="MGDA", exchange="allgather", mode="global"),
    "global_two_pass MGDA": dict(solver="MGDA", mode="global_two_pass"),
    # Layouts beyond one rank per language (issue "Choosing a layout"); each against its own stock run.
    "bucket MGDA sharded, 2 ranks per language": dict(solver="MGDA", ranks_per_language=2),
    "stock ZeRO-2, 2 batches per rank": dict(strategy="stock", languages_per_rank=2),
    "bucket MGDA sharded, 2 languages per rank": dict(solver="MGDA", languages_per_rank=2, baseline="stock ZeRO-2, 2 batches per rank"),
    "stock ZeRO-3": dict(strategy="stock", stage=3),
    "bucket MGDA ZeRO-3 sharded": dict(solver="MGDA", stage=3, baseline="stock ZeRO-3"),
    "bucket CAGrad ZeRO-3 sharded": dict(solver="CAGrad", stage=3, baseline="stock ZeRO-3"),
    "stock DDP": dict(strategy="ddp_stock"),
    "bucket MGDA DDP sharded": dict(solver="MGDA", strategy="ddp", baseline="stock DDP"),
    # FSDP2: every Linear layer one fully_shard unit (= one bucket), against stock FSDP2 with the same units.
    "stock FSDP": dict(strategy="fsdp_stock"),
    "bucket MGDA FSDP sharded": dict(solver="MGDA", strategy="fsdp", baseline="stock FSDP"),
    "bucket MGDA FSDP allgather": dict(solver="MGDA", strategy="fsdp", exchange="allgather", baseline="stock FSDP"),
    "bucket CAGrad FSDP sharded": dict(solver="CAGrad", strategy="fsdp", baseline="stock FSDP"),
}


# ---------------------------------------------------------------- worker (one rank)
class ByteCounter:
    """Wraps torch.distributed collectives; counts bytes this rank sends while ``active``."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.active, self.sent = False, 0
        n = dist.get_world_size

        def size(t) -> int:
            return t.numel() * t.element_size()

        # Each cost takes the collective's positional and keyword arguments (DeepSpeed passes keywords).
        def arg(a, k, i, name):
            return a[i] if len(a) > i else k[name]

        costs = {
            "all_reduce": lambda a, k: 2 * size(arg(a, k, 0, "tensor")) * (n() - 1) / n(),
            "reduce": lambda a, k: size(arg(a, k, 0, "tensor")) * (n() - 1) / n(),
            "broadcast": lambda a, k: size(arg(a, k, 0, "tensor")) * (n() - 1) / n(),
            "reduce_scatter_tensor": lambda a, k: size(arg(a, k, 1, "input")) * (n() - 1) / n(),
            "all_gather_into_tensor": lambda a, k: size(arg(a, k, 1, "input_tensor")) * (n() - 1),
            "all_gather": lambda a, k: size(arg(a, k, 1, "tensor")) * (n() - 1),
            # FSDP2's collectives (the deprecated names above call these without going through ``dist``).
            "reduce_scatter_single": lambda a, k: size(arg(a, k, 1, "input")) * (n() - 1) / n(),
            "all_gather_single": lambda a, k: size(arg(a, k, 1, "input_tensor")) * (n() - 1),
            "all_to_all_single": lambda a, k: _all_to_all_cost(arg(a, k, 1, "input"), a[3] if len(a) > 3 else k.get("input_split_sizes"), dist.get_rank(), n()),
            # The DDP hook's gather of the combined slices: what the batch's sends carry.
            "batch_isend_irecv": lambda a, k: sum(size(op.tensor) for op in arg(a, k, 0, "p2p_op_list") if op.op is dist.isend),
        }
        for name, cost in costs.items():
            setattr(dist, name, self._wrap(getattr(dist, name), cost))

    def _wrap(self, fn, cost):
        def counted(*args, **kwargs):
            if self.active:
                self.sent += cost(args, kwargs)
            return fn(*args, **kwargs)

        return counted


def _vm_hwm_kib() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])


def _all_to_all_cost(inp, splits, rank: int, world: int) -> int:
    kept = splits[rank] if splits else inp.numel() // world
    return (inp.numel() - kept) * inp.element_size()


def worker(spec: dict) -> None:
    # Install the counter before DeepSpeed captures references to the collectives.
    counter = ByteCounter()
    import lightning.pytorch as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader

    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    import lightning_moo.solvers as solvers
    from lightning_moo.strategies import BucketMOODDPStrategy, BucketMOOFSDPStrategy, BucketMOOStrategy, StockDeepSpeedStrategy

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    # Run every benchmarked solver once in every configuration (stock too), so that what their
    # libraries load is not counted as training memory.
    for name in ("MGDA", "CAGrad", "PCGrad"):
        getattr(solvers, name)()(torch.eye(world, dtype=torch.float64) + 0.5)
    # Likewise the modules the strategies' start-up check imports (DeepSpeed's, for the FSDP rows).
    from lightning_moo._compat import check_internals

    check_internals()
    width, layers, batch = spec["width"], spec["layers"], spec["batch"]
    # m languages per rank: m batches per step (stock: one backward of their mean; MOO: m - 1
    # stashed gradients and one backward). k ranks per language: T = world / k languages.
    m, k = spec.get("languages_per_rank", 1), spec.get("ranks_per_language", 1)

    class MLP(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width), nn.ReLU())])
            gen = torch.Generator().manual_seed(rank)
            self.xs = [torch.randn(batch, width, generator=gen) for _ in range(m)]
            self.ys = [torch.randn(batch, width, generator=gen) for _ in range(m)]

        def training_step(self, _, batch_idx):
            losses = [nn.functional.mse_loss(self.net(x), y) for x, y in zip(self.xs, self.ys)]
            if hasattr(self.trainer.strategy, "stash_gradient") and m > 1:
                for loss in losses[:-1]:
                    self.trainer.strategy.stash_gradient(loss)
                return losses[-1]
            return sum(losses) / m

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-4)

    class ShardedMLP(MLP):
        """Stock FSDP2: the units BucketMOOFSDPStrategy(units=["Linear"]) forms, sharded the stock way."""

        def configure_model(self):
            from torch.distributed.fsdp import fully_shard

            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=self.device_mesh["data_parallel"])
            fully_shard(self, mesh=self.device_mesh["data_parallel"])

    class Timer(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            counter.active = batch_idx >= spec["warmup"]
            if batch_idx == spec["warmup"]:
                # Peak RSS from here on: the timed steps only (Linux: "5" resets VmHWM).
                Path("/proc/self/clear_refs").write_text("5")
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            counter.active = False
            if batch_idx >= spec["warmup"]:
                self.times.append(time.perf_counter() - self.start)

    zero = dict(stage=spec.get("stage", 2), reduce_bucket_size=spec["bucket"], logging_batch_size_per_gpu=batch)
    ddp = dict(bucket_cap_mb=spec["bucket"] * 4 / 2**20, find_unused_parameters=True)  # same buckets from step 1
    kind = spec.get("strategy", "moo")
    if kind == "stock":
        strategy = StockDeepSpeedStrategy(**zero)
    elif kind == "ddp_stock":
        strategy = DDPStrategy(**ddp)
    elif kind == "fsdp_stock":
        strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
    else:
        solver = getattr(solvers, spec["solver"])()
        languages = world * m // k
        if kind == "ddp":
            strategy = BucketMOODDPStrategy(solver=solver, exchange=spec.get("exchange", "sharded"), languages=languages, **ddp)
        elif kind == "fsdp":
            strategy = BucketMOOFSDPStrategy(solver=solver, exchange=spec.get("exchange", "sharded"), languages=languages, units=["Linear"])
        else:
            strategy = BucketMOOStrategy(
                solver=solver, exchange=spec.get("exchange", "sharded"), mode=spec.get("mode", "bucket"), languages=languages, **zero
            )
    timer, model = Timer(), ShardedMLP() if kind == "fsdp_stock" else MLP()
    steps = spec["warmup"] + spec["steps"]
    trainer = pl.Trainer(
        accelerator="cpu", devices=world, strategy=strategy, max_steps=steps, callbacks=[timer], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
    )
    trainer.fit(model, DataLoader(range(steps), batch_size=None))
    sent = counter.sent / len(timer.times)
    if kind == "ddp_stock":
        # DDP's C++ reducer all-reduces outside torch.distributed's Python functions, which the
        # counter wraps: charge the all-reduce of every gradient it performs.
        sent = 2 * sum(p.numel() * p.element_size() for p in model.parameters()) * (world - 1) / world
    result = dict(
        step_s=statistics.median(timer.times),
        bytes_per_step=sent,
        peak_rss_mb=_vm_hwm_kib() / 1024,
        params=sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()),  # ZeRO-3: full sizes
        buckets=len(getattr(strategy, "buckets", {})),
    )
    Path(spec["out"], f"rank{rank}.json").write_text(json.dumps(result))
    # Leave together: a rank whose peer already exited can abort in gloo's teardown.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


# ---------------------------------------------------------------- driver
def launch(spec: dict, world: int, tmp: Path) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = dict(spec, out=str(tmp))
    procs = []
    for rank in range(world):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), NODE_RANK="0")
        # A fixed mmap threshold makes glibc return freed large blocks to the OS, so peak RSS
        # measures live memory instead of how many freed buffers the allocator kept (which
        # otherwise varies by ±100 MiB between configurations of the same live size).
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / f"rank{rank}.err", "w")))
    codes = [p.wait(timeout=1800) for p in procs]
    if any(codes):
        raise RuntimeError(f"benchmark ranks failed {codes}:\n" + (tmp / "rank0.err").read_text()[-3000:])
    ranks = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(world)]
    # The slowest rank sets the step time; report the worst rank for every quantity.
    return {k: max(r[k] for r in ranks) for k in ranks[0]}


def _ratio(value: float, stock: float) -> str:
    return f"{value / stock:.2f}" if stock else "-"  # one rank: stock sends nothing


def _step_ratio(runs: dict[str, list[dict]], name: str) -> str:
    """The step time against the baseline's, round by round: the median ratio, and its range over several rounds."""
    baseline = runs[CONFIGS[name].get("baseline", "stock ZeRO-2")]
    ratios = sorted(r["step_s"] / b["step_s"] for r, b in zip(runs[name], baseline))
    median = f"{statistics.median(ratios):.2f}"
    return median if len(ratios) == 1 else f"{median} ({ratios[0]:.2f}–{ratios[-1]:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--bucket", type=int, default=2_000_000, help="reduce_bucket_size (elements)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the configurations this many times, interleaved (baseline, a, b, baseline, a, b, ...); "
                             "report medians, and each configuration's ratio to its baseline of the same round")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/overhead.md"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    import tempfile

    common = dict(width=args.width, layers=args.layers, batch=args.batch, bucket=args.bucket, warmup=args.warmup, steps=args.steps)
    lines = [
        "# Bucket-level MOO overhead against stock DeepSpeed ZeRO-2",
        "",
        f"Command: `python benchmarks/overhead.py {shlex.join(sys.argv[1:])}`",
        "",
        f"MLP {args.layers}×Linear({args.width},{args.width}), batch {args.batch} per rank, Adam, "
        f"reduce_bucket_size {args.bucket:,} elements ({args.bucket * 4 / 2**20:.1f} MiB fp32), CPU/gloo, "
        f"{os.cpu_count()} CPU cores, {args.warmup} warm-up + {args.steps} timed steps; worst rank reported. "
        "Peak RSS is over the timed steps with MALLOC_MMAP_THRESHOLD_=65536.",
        "",
        "| ranks | configuration | buckets | step (s) | × stock | MiB sent/step/rank | × stock | peak RSS (MiB) | Δ vs stock (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    if args.rounds > 1:
        lines[6:6] = [f"Every configuration ran {args.rounds} times, interleaved; step, bytes and RSS are medians over the rounds, "
                      "the step's × stock is the median of each round's ratio to its own baseline, with the range over the rounds.", ""]
    for world in args.ranks:
        runs: dict[str, list[dict]] = {}
        baselines = ["stock ZeRO-2"] + [CONFIGS[n]["baseline"] for n in args.configs if "baseline" in CONFIGS[n]]
        names = [name for name in dict.fromkeys(baselines + args.configs)  # baselines first, each once
                 if not ("solver" in CONFIGS[name]  # a single language: nothing to combine
                         and world * CONFIGS[name].get("languages_per_rank", 1) // CONFIGS[name].get("ranks_per_language", 1) < 2)]
        for _ in range(args.rounds):
            for name in names:
                with tempfile.TemporaryDirectory() as tmp:
                    runs.setdefault(name, []).append(launch(dict(common, **CONFIGS[name]), world, Path(tmp)))
        results = {name: {k: statistics.median(run[k] for run in rs) for k in rs[0]} for name, rs in runs.items()}
        for name in names:
            r, s = results[name], results[CONFIGS[name].get("baseline", "stock ZeRO-2")]
            line = (
                f"| {world} | {name} | {r['buckets'] or '-'} | {r['step_s']:.3f} | {_step_ratio(runs, name)} | "
                f"{r['bytes_per_step'] / 2**20:.1f} | {_ratio(r['bytes_per_step'], s['bytes_per_step'])} | "
                f"{r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - s['peak_rss_mb']:+.0f} |"
            )
            print(line, flush=True)
            lines.append(line)
    lines.append("")
    lines.append(f"Parameters: {results['stock ZeRO-2']['params']:,}. Rows with a `baseline` compare with it instead of stock "
                 "ZeRO-2: '2 languages per rank' with stock ZeRO-2 running the same 2 batches per rank (one backward of "
                 "their mean), DDP with stock DDP (same bucket_cap_mb; its bytes are "
                 "computed, 2n(N-1)/N for n gradient bytes, because DDP's reducer bypasses the counted Python collectives); "
                 "ZeRO-3 rows with stock ZeRO-3 (the same reduce_bucket_size); FSDP rows with stock FSDP2 (every Linear "
                 "one fully_shard unit, i.e. one bucket, in both).")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
