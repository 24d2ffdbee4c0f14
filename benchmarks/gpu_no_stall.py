"""Does bucket-level MOO stall the GPU? One run on one GPU (on an H200, 5.5 minutes for six of its nine
configurations, so about 8.5 for all: benchmarks/results/gpu_no_stall.md).

    python benchmarks/gpu_no_stall.py --out benchmarks/results/gpu_no_stall.md
    python benchmarks/gpu_no_stall.py --smoke --out /tmp/smoke.md      # a tiny model (CPU: ~1 minute)
    python benchmarks/gpu_no_stall.py --configs stock Mean "MGDA on device"   # some configurations only

A randomly initialised Llama of ~1B parameters (bf16, 20 layers, hidden 2048) trains with DeepSpeed
ZeRO-2 (overlap_comm, 5e7-element buckets, the default) at world size 1, four languages on the one
rank (three gradients stashed, the fourth backpropagated into the buckets), on random token batches.
Configurations, each in a fresh Trainer of the same process:

- ``stock``: stock DeepSpeed, one backward of the mean of the four languages' losses;
- ``stock, a backward per language``: stock DeepSpeed backpropagating each language's quarter of
  that mean on its own, four backward passes into the same gradients (ZeRO-2 reduces the buckets
  after each: four reductions a step, where ours reduce once): what per-language backward passes
  cost without any of our code;
- ``stock, four backward passes, three discarded``: stock DeepSpeed where the first three languages'
  gradients are computed as ``stash_gradient`` computes them (``torch.autograd.grad``, which
  DeepSpeed does not see) and then dropped, the fourth backpropagated into stock's reduction: not a
  training method, a timing floor. Ours runs exactly these four backward passes and one reduction a
  step, so what it costs beyond this row is what our code adds (holding, copying, the Grams, the
  solve and the combination);
- ``Mean``: our strategy with ``Mean``: the same four backward passes as the MOO runs, so
  ``× Mean`` isolates what the solver and its synchronisation cost;
- ``Mean, stash in host memory``: the same with ``stash_device="cpu"`` (the three stashed gradients
  in pinned host memory, copied back one bucket at a time): whether those copies wait for the
  device, what they cost, the device memory they save; it must train exactly what ``Mean`` trains;
- ``MGDA on device``: MGDA solved on the GPU by enumeration (the default on CUDA for T ≤ 12);
- ``MGDA on host``: the exact active-set solver on a float64 host copy of the Gram (``on_device=False``);
- ``CAGrad on device`` / ``CAGrad on host``: the same for CAGrad (c = 0.4).

It reports (a) synchronisations: ``torch.cuda.set_sync_debug_mode("warn")`` is on while DeepSpeed's
``average_tensor`` (our hook, or stock's own) runs in one untimed step and, in the next, while each
backward runs (the stashed languages' too); every warning is counted, and where in the
Python code each came from is listed; (b) the median step time over the timed steps, as
ratios against ``stock``, ``Mean`` and the timing floor (four backward passes) measured in the same
invocation, and the peak memory above what the configuration started with (each engine is destroyed
after its run, so little is left); (c) a ``torch.profiler``
summary of two steps per configuration: device time, host time, the host time spent in
synchronising calls, the operators and kernels that take the most device time beyond stock's, and
the operators that take the most host time beyond ``Mean``'s. On CPU (a) and the device columns are "n/a".
The last lines compare each solver's final parameters on device and on host. Before training, two
tables from ``solver_speed.py`` on the same device: the operators and time per on-device solve
(``--on-device``), and one bucket's Gram, per-parameter Grams and combine against a stock mean
(``--kernels-only`` runs just these). A configuration that
fails is reported with its error and the rest still run; the report is rewritten after every
configuration, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import shlex
import statistics
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import torch
from deepspeed.runtime.engine import DeepSpeedEngine
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_moo import _compat
from lightning_moo.solvers import CAGrad, MGDA, Mean
from lightning_moo.strategies import BucketMOOStrategy, StockDeepSpeedStrategy

FULL = dict(model=dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=20, num_attention_heads=16,
                       num_key_value_heads=4, vocab_size=32000, max_position_embeddings=1024),
            batch=4, seq=512, warmup=3, timed=10, bucket=50_000_000)
SMOKE = dict(model=dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=256, max_position_embeddings=64),
             batch=2, seq=32, warmup=3, timed=2, bucket=4000)
LANGUAGES = 4
PER_LANGUAGE = "stock, a backward per language"
DISCARDED = "stock, four backward passes, three discarded"
HOST_STASH = "Mean, stash in host memory"
# The stock configurations (no code of ours on the reduction path) and how each backpropagates.
STOCK_BACKWARD = {"stock": "mean", PER_LANGUAGE: "each", DISCARDED: "discard"}
CONFIGURATIONS = ["stock", PER_LANGUAGE, DISCARDED, "Mean", HOST_STASH, "MGDA on device", "MGDA on host", "CAGrad on device",
                  "CAGrad on host"]
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy", "aten::_local_scalar_dense")


class SyncWatch:
    """Counts CUDA synchronisation warnings (``set_sync_debug_mode("warn")``) while it watches, by
    where in the Python code each came from. On CPU it only counts how often it watched."""

    def __init__(self, cuda: bool) -> None:
        self.cuda, self.calls, self.where = cuda, 0, Counter()

    @contextlib.contextmanager
    def watching(self):
        self.calls += 1
        if not self.cuda:
            yield
            return
        # Module-wide, so warnings raised on autograd's device thread are caught too.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode("default")
                for w in caught:
                    # Not the one-time notice that the debug mode is a prototype.
                    if "called a synchronizing" in str(w.message):
                        self.where[f"{Path(w.filename).name}:{w.lineno} {str(w.message)[:70]}"] += 1

    @property
    def count(self) -> int:
        return sum(self.where.values())


class RandomLlama(pl.LightningModule):
    """Four languages on one rank: a random batch each, the first three stashed (MOO), all four in
    one mean loss (``backward="mean"``, stock), each quarter of it backpropagated on its own
    (``backward="each"``, stock), or the first three languages' gradients computed unseen by
    DeepSpeed and dropped (``backward="discard"``, stock: the timing floor). ``self.watch`` wraps
    each backward (by default it does nothing)."""

    def __init__(self, model: dict, batch: int, seq: int, backward: str, device: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        with torch.device(device):  # a 1B model initialises in seconds on the GPU, in a minute on the CPU
            self.model = LlamaForCausalLM(LlamaConfig(**model))
        self.batch, self.seq, self.backward_mode = batch, seq, backward
        self.vocab = model["vocab_size"]
        self.automatic_optimization = False
        self.watch = contextlib.nullcontext

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=1e-5)

    def _loss(self, language: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 * self.trainer.fit_loop.total_batch_idx + language)
        ids = torch.randint(self.vocab, (self.batch, self.seq), generator=g).to(self.device)
        return self.model(input_ids=ids, labels=ids).loss

    def training_step(self, _, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        if self.backward_mode == "mean":
            loss = torch.stack([self._loss(t) for t in range(LANGUAGES)]).mean()
        elif self.backward_mode == "each":
            for t in range(LANGUAGES - 1):
                with self.watch():
                    self.manual_backward(self._loss(t) / LANGUAGES)
            loss = self._loss(LANGUAGES - 1) / LANGUAGES
        elif self.backward_mode == "discard":
            params = [p for p in self.model.parameters() if p.requires_grad]
            for t in range(LANGUAGES - 1):
                loss = self._loss(t)
                with self.watch(), _compat.invisible_to_engine(self.trainer.strategy.deepspeed_engine):
                    torch.autograd.grad(loss, params)  # as stash_gradient computes it, then dropped
            loss = self._loss(LANGUAGES - 1)
        else:
            for t in range(LANGUAGES - 1):
                loss = self._loss(t)
                with self.watch():
                    self.trainer.strategy.stash_gradient(loss)
            loss = self._loss(LANGUAGES - 1)
        with self.watch():
            self.manual_backward(loss)
        optimizer.step()


class Measure(Callback):
    """Step times (device synchronised at the step's edges only); sync warnings inside the bucket
    reductions of step 1 and inside the backward passes of step 2 (both untimed: warm-up has at
    least 3 steps); a profile of two steps after the timed ones."""

    def __init__(self, warmup: int, timed: int, cuda: bool) -> None:
        assert warmup >= 3, "steps 1 and 2 are watched for synchronisations and must not be timed"
        self.warmup, self.timed, self.cuda = warmup, timed, cuda
        self.times: list[float] = []
        self.in_reductions, self.in_backward = SyncWatch(cuda), SyncWatch(cuda)
        self.profile = None
        self._start = 0.0

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        step = batch_idx  # one optimizer step per batch
        if step == 1:
            self._watch_reductions(trainer.strategy.deepspeed_engine.optimizer)
        if step == 2:
            module.watch = self.in_backward.watching
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
        if step == 1:
            trainer.strategy.deepspeed_engine.optimizer.average_tensor = self._unwatched  # stock's or our hook
        if step == 2:
            module.watch = contextlib.nullcontext
        if step == self.warmup + self.timed + 1 and self.profile is not None:
            self.profile.__exit__(None, None, None)

    def _watch_reductions(self, optimizer) -> None:
        original = self._unwatched = optimizer.average_tensor

        def watched(*args, **kwargs):
            with self.in_reductions.watching():
                return original(*args, **kwargs)

        optimizer.average_tensor = watched


def deepspeed_config(bucket: int) -> dict:
    return {"zero_optimization": {"stage": 2, "contiguous_gradients": True, "overlap_comm": True,
                                  "reduce_bucket_size": bucket, "allgather_bucket_size": bucket},
            "data_types": {"grad_accum_dtype": "fp32"}, "train_micro_batch_size_per_gpu": 1,
            "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0}


def trained_steps(settings: dict) -> int:
    """Warm-up, timed, and the two profiled steps."""
    return settings["warmup"] + settings["timed"] + 2


def train(name: str, settings: dict, cuda: bool) -> dict:
    stock = name in STOCK_BACKWARD
    backward = STOCK_BACKWARD[name] if stock else "stash"  # "stash": through our strategy
    solvers = {"Mean": (Mean(), None), HOST_STASH: (Mean(), None), "MGDA on device": (MGDA(), True), "MGDA on host": (MGDA(), False),
               "CAGrad on device": (CAGrad(c=0.4), True), "CAGrad on host": (CAGrad(c=0.4), False)}
    config = deepspeed_config(settings["bucket"])
    if stock:
        strategy = StockDeepSpeedStrategy(config=config)
    else:
        solver, on_device = solvers[name]
        strategy = BucketMOOStrategy(solver=solver, languages=LANGUAGES, on_device=on_device, config=config,
                                     stash_device="cpu" if name == HOST_STASH else None)
    held = torch.cuda.memory_allocated() if cuda else 0  # what earlier configurations left
    module = RandomLlama(settings["model"], settings["batch"], settings["seq"], backward, "cuda" if cuda else "cpu")
    measure = Measure(settings["warmup"], settings["timed"], cuda)
    steps = trained_steps(settings)
    pl.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, strategy=strategy, precision=settings["precision"],
               max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, use_distributed_sampler=False, callbacks=[measure]
               ).fit(module, DataLoader(range(steps), batch_size=None))
    result = dict(name=name, step=statistics.median(measure.times), times=measure.times,
                  in_reductions=measure.in_reductions, in_backward=measure.in_backward,
                  peak=(torch.cuda.max_memory_allocated() - held) / 2**30 if cuda else float("nan"),
                  buckets=len(getattr(strategy, "buckets", {}) or {}),
                  params={n: p.detach().float().cpu() for n, p in module.model.named_parameters()},
                  profile=summarize(measure.profile, cuda))
    # DeepSpeed's gradient hooks on the parameters keep the engine alive after fit (a cycle through
    # autograd that Python's collector cannot see): ~14 GiB of device memory per configuration for
    # the 1B model, 98 GiB held when the eighth starts. Removing them lets gc free it.
    strategy.deepspeed_engine.destroy()
    return result


def summarize(profile, cuda: bool) -> dict:
    events = profile.key_averages()
    host = sum(e.self_cpu_time_total for e in events) / 1e3
    device = sum(getattr(e, "self_device_time_total", 0.0) for e in events) / 1e3 if cuda else float("nan")
    syncing = sum(e.self_cpu_time_total for e in events if any(s in e.key for s in SYNC_CALLS)) / 1e3
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:5]
    on_device = {e.key: getattr(e, "self_device_time_total", 0.0) / 1e3 for e in events} if cuda else {}
    on_host = {e.key: e.self_cpu_time_total / 1e3 for e in events}
    return dict(host=host, device=device, syncing=syncing, on_device=on_device, on_host=on_host,
                top=", ".join(f"{e.key} {e.self_cpu_time_total / 1e3:.1f}" for e in top))


def report(results: list[dict], settings: dict, device: str, command: str) -> str:
    """The markdown report of the configurations run so far (a failed one shows its error)."""
    done = {r["name"]: r for r in results if "error" not in r}
    stock, mean, floor = (done[n]["step"] if n in done else float("nan") for n in ("stock", "Mean", DISCARDED))
    numel = next((sum(p.numel() for p in r["params"].values()) for r in done.values()), float("nan"))
    lines = [
        "# Bucket-level MOO on one GPU: synchronisation inside the reductions, step time, profile", "",
        f"Command: `{command}`", "",
        f"Device: {device}; torch {torch.__version__}. Random Llama, {numel / 1e6:,.1f}M parameters, "
        f"{LANGUAGES} languages on one rank, batch {settings['batch']} × {settings['seq']} tokens each, "
        f"{settings['precision']}, ZeRO-2 with overlap_comm, reduce_bucket_size {settings['bucket']:,}; "
        f"median of {settings['timed']} steps after {settings['warmup']} warm-up.", "",
        "| configuration | buckets | sync warnings in reductions (calls) | sync warnings in backward passes (calls) |"
        " step (s) | × stock | × Mean | × four backward passes | peak GiB | profile: host ms | device ms |"
        " host ms in sync calls |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error']} |")
            continue
        watched = [f"{w.count if w.cuda else 'n/a'} ({w.calls})" for w in (r["in_reductions"], r["in_backward"])]
        p = r["profile"]
        peak, device_ms = ("n/a", "n/a") if r["peak"] != r["peak"] else (f"{r['peak']:.1f}", f"{p['device']:.0f}")
        lines.append(f"| {r['name']} | {r['buckets'] or '-'} | {watched[0]} | {watched[1]} | {r['step']:.3f} | "
                     f"{r['step'] / stock:.2f} | {r['step'] / mean:.2f} | {r['step'] / floor:.2f} | {peak} | {p['host']:.0f} | {device_ms} | "
                     f"{p['syncing']:.1f} |")
    lines.append("")
    steps = trained_steps(settings)
    for solver in ("MGDA", "CAGrad"):
        pair = [done.get(f"{solver} on {where}") for where in ("device", "host")]
        if None in pair:
            continue
        device_params, host_params = pair[0]["params"], pair[1]["params"]
        diff = max(float(((device_params[n] - host_params[n]).abs() / host_params[n].abs().max().clamp_min(1e-12)).max())
                   for n in host_params)
        lines.append(f"{solver} on device vs on host after {steps} steps: "
                     f"max relative |Δθ| = {diff:.2e}")
    if "Mean" in done and HOST_STASH in done:  # the stash's bf16/fp32 values go to the host and back unchanged
        diff = max(float((done[HOST_STASH]["params"][n] - p).abs().max()) for n, p in done["Mean"]["params"].items())
        lines.append(f"{HOST_STASH} vs Mean after {steps} steps: "
                     f"max |Δθ| = {diff:.2e} (0 expected: the same arithmetic)")
    lines += ["", "Where the synchronisation warnings came from (file:line, message: count):", ""]
    for r in done.values():
        for label, watch in (("reductions", r["in_reductions"]), ("backward", r["in_backward"])):
            if watch.where:
                lines.append(f"- {r['name']}, {label}: " + "; ".join(f"`{k}`: {v}" for k, v in watch.where.most_common(6)))
    lines += ["", "Step times (s), in order:", ""]
    lines += [f"- {r['name']}: " + ", ".join(f"{t:.3f}" for t in r["times"]) for r in done.values()]
    lines += ["", "Top host operators over the two profiled steps (self ms):", ""]
    lines += [f"- {r['name']}: {r['profile']['top']}" for r in done.values()]
    lines += _beyond(done, "stock", "on_device", "Where the extra device time goes: the operators and kernels with the "
                     "most self device time beyond stock's over the two profiled steps (ms more than stock):")
    lines += _beyond(done, DISCARDED, "on_device", "The same beyond four backward passes with three discarded (what "
                     "our code adds once the backward passes themselves are paid for):")
    lines += _beyond(done, "Mean", "on_host", "Where the solvers' extra host time goes: the operators with the most self "
                     "host time beyond Mean's over the two profiled steps (ms more than Mean; Python run inside an "
                     "operator, such as the bucket hook inside AccumulateGrad, counts as its self time):")
    return "\n".join(lines) + "\n"


def _beyond(done: dict, base_name: str, kind: str, title: str) -> list[str]:
    """The operators with the most profiled time of ``kind`` beyond ``base_name``'s, per configuration (beyond
    stock: every other one; beyond another: ours only)."""
    if base_name not in done or not done[base_name]["profile"][kind]:
        return []
    base, lines = done[base_name]["profile"][kind], ["", title, ""]
    for r in (r for r in done.values() if r["name"] != base_name and (base_name == "stock" or r["name"] not in STOCK_BACKWARD)):
        extra = {k: v - base.get(k, 0.0) for k, v in r["profile"][kind].items()}
        top = sorted(extra.items(), key=lambda kv: kv[1], reverse=True)[:6]
        lines.append(f"- {r['name']}: " + "; ".join(f"`{k[:60]}` +{v:.1f}" for k, v in top))
    return lines


def kernel_tables(cuda: bool, smoke: bool) -> str:
    """``solver_speed.py``'s on-device solver table and one bucket's kernel table (T = 4, float32),
    measured on this run's device, as markdown."""
    spec = importlib.util.spec_from_file_location("solver_speed", Path(__file__).with_name("solver_speed.py"))
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    device = "cuda" if cuda else "cpu"
    elements = 200_000 if smoke else FULL["bucket"]
    tables = [
        (f"On-device solvers: one call per bucket, hard-conflict Grams, median of {2 if smoke else 20}",
         speed.on_device_table([2, 4] if smoke else [2, 4, 8, 12], 2 if smoke else 20, device)),
        (f"One bucket: {elements:,} elements × T={LANGUAGES}, float32",
         speed.kernel_table(elements, LANGUAGES, device, torch.float32, 2 if smoke else 5)),
    ]
    return "\n\n".join(f"### {title}\n\n{speed.markdown(*table)}" for title, table in tables) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a tiny model, a few steps: checks the script runs")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even where CUDA is available")
    parser.add_argument("--out", type=Path, help="write the markdown report here (after every configuration)")
    parser.add_argument("--configs", nargs="+", choices=CONFIGURATIONS, default=CONFIGURATIONS, metavar="NAME",
                        help=f"run only these configurations, in this order (default: all of {CONFIGURATIONS})")
    parser.add_argument("--kernels-only", action="store_true", help="only the solver and kernel tables, no training")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu
    if not cuda and not args.smoke:
        sys.exit("no CUDA device: the full run is for a GPU; --smoke checks the script on the CPU")
    settings = dict(SMOKE if args.smoke else FULL)
    settings["precision"] = "bf16-mixed" if cuda else "32-true"
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT="29543", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1").items():
        os.environ.setdefault(key, value)
    device = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    command = shlex.join(["python", "benchmarks/gpu_no_stall.py", *(argv if argv is not None else sys.argv[1:])])
    print("solver and kernel tables ...", flush=True)
    kernels = kernel_tables(cuda, args.smoke)
    text = kernels
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"Command: `{command}`\n\nDevice: {device}; torch {torch.__version__}.\n\n{kernels}")
    results = []
    for i, name in enumerate([] if args.kernels_only else args.configs):
        started = time.perf_counter()
        print(f"[{i + 1}/{len(args.configs)}] {name} ...", flush=True)
        try:
            results.append(train(name, settings, cuda))
        except Exception as error:  # reported in its row; the other configurations still run
            traceback.print_exc()
            results.append(dict(name=name, error=f"{type(error).__name__}: {str(error)[:300]}".replace("|", "/").replace("\n", " ")))
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        left = torch.cuda.memory_allocated() / 2**30 if cuda else 0.0
        r = results[-1]
        engines = sum(isinstance(o, DeepSpeedEngine) for o in gc.get_objects())  # 0: nothing of this run holds memory
        print(json.dumps(dict(name=name, seconds=round(time.perf_counter() - started, 1), memory_left_gib=round(left, 2),
                              engines_alive=engines,
                              **({"error": r["error"]} if "error" in r else
                                 dict(step=r["step"], sync_reductions=r["in_reductions"].count,
                                      sync_backward=r["in_backward"].count, peak_gib=r["peak"])))), flush=True)
        text = report(results, settings, device, command) + "\n" + kernels
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text)
    print(text)
    if any("error" in r for r in results):
        sys.exit("some configurations failed: see their rows")


if __name__ == "__main__":
    main()
