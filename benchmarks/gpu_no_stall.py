"""Does bucket-level MOO stall the GPU? One prepared run on one GPU (about 7 minutes on an H200).

    python benchmarks/gpu_no_stall.py --out benchmarks/results/gpu_no_stall.md
    python benchmarks/gpu_no_stall.py --smoke --out /tmp/smoke.md      # CPU, a tiny model, ~1 minute

A randomly initialised Llama of ~1B parameters (bf16, 20 layers, hidden 2048) trains with DeepSpeed
ZeRO-2 (overlap_comm, 5e7-element buckets, the default) at world size 1, four languages on the one
rank (three gradients stashed, the fourth backpropagated into the buckets), on random token batches.
Configurations, each in a fresh Trainer of the same process:

- ``stock``: stock DeepSpeed, one backward of the mean of the four languages' losses;
- ``Mean``: our strategy with ``Mean``: the same four backward passes as the MOO runs, so
  ``× Mean`` isolates what the solver and its synchronisation cost;
- ``MGDA on device``: MGDA solved on the GPU by enumeration (the default on CUDA for T ≤ 12);
- ``MGDA on host``: the exact active-set solver on a float64 host copy of the Gram (``on_device=False``);
- ``CAGrad on device`` / ``CAGrad on host``: the same for CAGrad (c = 0.4).

It reports (a) synchronisations inside the bucket reductions: on one untimed step,
``torch.cuda.set_sync_debug_mode("warn")`` is on while DeepSpeed's ``average_tensor`` (our hook, or
stock's own) runs, and every warning is counted; (b) the median step time over the timed steps, as
ratios against ``stock`` and ``Mean`` measured in the same invocation, and the peak memory; (c) a
``torch.profiler`` summary of two steps per configuration: device time, host time, and the host
time spent in synchronising calls. Under ``--smoke`` (CPU) (a) and the device columns are "n/a".
The last line of the table compares MGDA's final parameters on device and on host.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_moo.solvers import CAGrad, MGDA, Mean
from lightning_moo.strategies import BucketMOOStrategy, StockDeepSpeedStrategy

FULL = dict(model=dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=20, num_attention_heads=16,
                       num_key_value_heads=4, vocab_size=32000, max_position_embeddings=1024),
            batch=4, seq=512, warmup=3, timed=10, bucket=50_000_000, precision="bf16-mixed")
SMOKE = dict(model=dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=256, max_position_embeddings=64),
             batch=2, seq=32, warmup=1, timed=2, bucket=4000, precision="32-true")
LANGUAGES = 4
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy", "aten::_local_scalar_dense")


class RandomLlama(pl.LightningModule):
    """Four languages on one rank: a random batch each, the first three stashed (MOO) or all four in
    one mean loss (stock)."""

    def __init__(self, model: dict, batch: int, seq: int, stock: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = LlamaForCausalLM(LlamaConfig(**model))
        self.batch, self.seq, self.stock = batch, seq, stock
        self.vocab = model["vocab_size"]
        self.automatic_optimization = False

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=1e-5)

    def _loss(self, language: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 * self.trainer.fit_loop.total_batch_idx + language)
        ids = torch.randint(self.vocab, (self.batch, self.seq), generator=g).to(self.device)
        return self.model(input_ids=ids, labels=ids).loss

    def training_step(self, _, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        if self.stock:
            self.manual_backward(torch.stack([self._loss(t) for t in range(LANGUAGES)]).mean())
        else:
            for t in range(LANGUAGES - 1):
                self.trainer.strategy.stash_gradient(self._loss(t))
            self.manual_backward(self._loss(LANGUAGES - 1))
        optimizer.step()


class Measure(Callback):
    """Step times (device synchronised at the step's edges only), sync warnings inside the bucket
    reductions of one untimed step, and a profile of two steps."""

    def __init__(self, warmup: int, timed: int, cuda: bool) -> None:
        self.warmup, self.timed, self.cuda = warmup, timed, cuda
        self.times: list[float] = []
        self.sync_warnings = self.reductions = 0
        self.profile = None
        self._start = 0.0

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        step = batch_idx  # one optimizer step per batch
        if step == 1 and self.cuda:
            self._watch(trainer.strategy.deepspeed_engine.optimizer)
        if step == self.warmup + self.timed:
            activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if self.cuda else [])
            self.profile = torch.profiler.profile(activities=activities)
            self.profile.__enter__()
        if self.cuda and step == self.warmup:
            torch.cuda.reset_peak_memory_stats()
        self._sync()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._sync()
        step = batch_idx
        if self.warmup <= step < self.warmup + self.timed:
            self.times.append(time.perf_counter() - self._start)
        if step == 1 and self.cuda:
            self._unwatch(trainer.strategy.deepspeed_engine.optimizer)
        if step == self.warmup + self.timed + 1 and self.profile is not None:
            self.profile.__exit__(None, None, None)

    def _watch(self, optimizer) -> None:
        original = optimizer.average_tensor

        def watched(*args, **kwargs):
            self.reductions += 1
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    return original(*args, **kwargs)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                    self.sync_warnings += sum("synchroniz" in str(w.message).lower() for w in caught)

        optimizer.average_tensor, self._original = watched, original

    def _unwatch(self, optimizer) -> None:
        optimizer.average_tensor = self._original


def deepspeed_config(bucket: int) -> dict:
    return {"zero_optimization": {"stage": 2, "contiguous_gradients": True, "overlap_comm": True,
                                  "reduce_bucket_size": bucket, "allgather_bucket_size": bucket},
            "data_types": {"grad_accum_dtype": "fp32"}, "train_micro_batch_size_per_gpu": 1,
            "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0}


def train(name: str, settings: dict, cuda: bool) -> dict:
    stock = name == "stock"
    solvers = {"Mean": (Mean(), None), "MGDA on device": (MGDA(), True), "MGDA on host": (MGDA(), False),
               "CAGrad on device": (CAGrad(c=0.4), True), "CAGrad on host": (CAGrad(c=0.4), False)}
    config = deepspeed_config(settings["bucket"])
    if stock:
        strategy = StockDeepSpeedStrategy(config=config)
    else:
        solver, on_device = solvers[name]
        strategy = BucketMOOStrategy(solver=solver, languages=LANGUAGES, on_device=on_device, config=config)
    module = RandomLlama(settings["model"], settings["batch"], settings["seq"], stock)
    measure = Measure(settings["warmup"], settings["timed"], cuda)
    steps = settings["warmup"] + settings["timed"] + 2
    pl.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, strategy=strategy, precision=settings["precision"],
               max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, use_distributed_sampler=False, callbacks=[measure]
               ).fit(module, DataLoader(range(steps), batch_size=None))
    result = dict(name=name, step=statistics.median(measure.times), sync=measure.sync_warnings, reductions=measure.reductions,
                  peak=torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
                  buckets=len(getattr(strategy, "buckets", {}) or {}),
                  params={n: p.detach().float().cpu() for n, p in module.model.named_parameters()},
                  profile=summarize(measure.profile, cuda))
    del module, strategy
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def summarize(profile, cuda: bool) -> dict:
    events = profile.key_averages()
    host = sum(e.self_cpu_time_total for e in events) / 1e3
    device = sum(getattr(e, "self_device_time_total", 0.0) for e in events) / 1e3 if cuda else float("nan")
    syncing = sum(e.self_cpu_time_total for e in events if any(s in e.key for s in SYNC_CALLS)) / 1e3
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:5]
    return dict(host=host, device=device, syncing=syncing, top=", ".join(f"{e.key} {e.self_cpu_time_total / 1e3:.1f}" for e in top))


def report(results: list[dict], settings: dict, device: str, command: str) -> str:
    stock, mean = results[0]["step"], results[1]["step"]
    numel = sum(p.numel() for p in results[0]["params"].values())
    lines = [
        "# Bucket-level MOO on one GPU: synchronisation inside the reductions, step time, profile", "",
        f"Command: `{command}`", "",
        f"Device: {device}; torch {torch.__version__}. Random Llama, {numel / 1e6:,.1f}M parameters, "
        f"{LANGUAGES} languages on one rank, batch {settings['batch']} × {settings['seq']} tokens each, "
        f"{settings['precision']}, ZeRO-2 with overlap_comm, reduce_bucket_size {settings['bucket']:,}; "
        f"median of {settings['timed']} steps after {settings['warmup']} warm-up.", "",
        "| configuration | buckets | sync warnings in reductions (calls) | step (s) | × stock | × Mean | peak GiB |"
        " profile: host ms | device ms | host ms in sync calls |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        sync = f"{r['sync']} ({r['reductions']})" if r["reductions"] else "n/a"
        p = r["profile"]
        peak, device_ms = ("n/a", "n/a") if r["peak"] != r["peak"] else (f"{r['peak']:.1f}", f"{p['device']:.0f}")
        lines.append(f"| {r['name']} | {r['buckets'] or '-'} | {sync} | {r['step']:.3f} | {r['step'] / stock:.2f} | "
                     f"{r['step'] / mean:.2f} | {peak} | {p['host']:.0f} | {device_ms} | {p['syncing']:.1f} |")
    by_name = {r["name"]: r for r in results}
    lines.append("")
    for solver in ("MGDA", "CAGrad"):
        device_params, host_params = by_name[f"{solver} on device"]["params"], by_name[f"{solver} on host"]["params"]
        diff = max(float(((device_params[n] - host_params[n]).abs() / host_params[n].abs().max().clamp_min(1e-12)).max())
                   for n in host_params)
        lines.append(f"{solver} on device vs on host after {settings['warmup'] + settings['timed'] + 2} steps: "
                     f"max relative |Δθ| = {diff:.2e}")
    lines += ["", "Top host operators over the two profiled steps (self ms):", ""]
    lines += [f"- {r['name']}: {r['profile']['top']}" for r in results]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, a tiny model, a few steps: checks the script runs")
    parser.add_argument("--out", type=Path, help="write the markdown report here")
    args = parser.parse_args(argv)
    cuda = not args.smoke
    if cuda and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke for the CPU check")
    settings = SMOKE if args.smoke else FULL
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT="29543", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1").items():
        os.environ.setdefault(key, value)
    device = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    names = ["stock", "Mean", "MGDA on device", "MGDA on host", "CAGrad on device", "CAGrad on host"]
    results = []
    for i, name in enumerate(names):
        print(f"[{i + 1}/{len(names)}] {name} ...", flush=True)
        results.append(train(name, settings, cuda))
    command = "python benchmarks/gpu_no_stall.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(results, settings, device, command.strip())
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
