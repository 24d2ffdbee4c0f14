"""What ConflictMonitor costs per step: the demo trained with and without it, in the same invocation.

Each run is the demo config (`configs/demo.yaml`: 4 CPU ranks, bucket MGDA in ZeRO-2, 150 steps,
validation every 50) through `lightning-moo fit`, with checkpoints off; the two variants alternate
`--repeats` times. Reported: fit time (on_train_start → on_train_end on rank zero) with the monitor
against without it, and the time rank zero spends inside the monitor's hooks as a share of the fit
(the monitor runs on rank zero only and hands its work to a writer thread; these hooks are what the
training loop waits for, including the final wait for that thread). The demo logs every 5 steps and
draws images every 50.

    python benchmarks/monitor_overhead.py --repeats 3 --out benchmarks/results/monitor_overhead.md
    python benchmarks/monitor_overhead.py --repeats 3 --image-every 1000 --out benchmarks/results/monitor_overhead.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import yaml

from lightning_moo.callbacks import ConflictMonitor

ROOT = Path(__file__).resolve().parents[1]


class FitClock(pl.Callback):
    """Rank zero's fit time, written to ``$MONITOR_OVERHEAD_OUT``."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            hooks = sum(getattr(cb, "seconds", 0.0) for cb in trainer.callbacks)
            Path(os.environ["MONITOR_OVERHEAD_OUT"]).write_text(json.dumps({"fit": time.perf_counter() - self.start, "hooks": hooks}))


class TimedConflictMonitor(ConflictMonitor):
    """ConflictMonitor with a stopwatch around the hooks that do its work."""

    seconds = 0.0

    def _timed(self, hook, *args) -> None:
        start = time.perf_counter()
        hook(*args)
        self.seconds += time.perf_counter() - start

    def on_train_batch_end(self, *args) -> None:
        self._timed(super().on_train_batch_end, *args)

    def on_validation_end(self, *args) -> None:
        self._timed(super().on_validation_end, *args)

    def on_train_end(self, *args) -> None:
        self._timed(super().on_train_end, *args)


def run(monitored: bool, steps: int, workdir: Path, overrides: dict) -> dict:
    config = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())
    monitor = next(cb for cb in config["trainer"]["callbacks"] if cb["class_path"].endswith("ConflictMonitor"))
    init_args = {**monitor["init_args"], **overrides}
    callbacks = [{"class_path": "monitor_overhead.TimedConflictMonitor", "init_args": init_args}] if monitored else []
    # Last, so that the fit it times includes the monitor's on_train_end (which waits for its writer thread).
    callbacks.append({"class_path": "monitor_overhead.FitClock"})
    config["trainer"].update(callbacks=callbacks, enable_checkpointing=False, max_steps=steps, default_root_dir=str(workdir))
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(workdir)
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    out = workdir / "times.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", MONITOR_OVERHEAD_OUT=str(out), PYTHONPATH=f"{ROOT / 'benchmarks'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cli = Path(sys.executable).with_name("lightning-moo")
    subprocess.run([str(cli), "fit", "--config", str(path)], cwd=ROOT, env=env, check=True, capture_output=True)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--log-every", type=int, help="override the demo's ConflictMonitor log_every_n_steps (5)")
    p.add_argument("--image-every", type=int, help="override the demo's ConflictMonitor image_every_n_steps (50)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    overrides = {k: v for k, v in {"log_every_n_steps": args.log_every, "image_every_n_steps": args.image_every}.items() if v}
    schedule = {"log_every_n_steps": 5, "image_every_n_steps": 50, **overrides}
    times: dict[bool, list[dict]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for monitored in (False, True):
                workdir = Path(tmp) / f"{r}_{monitored}"
                workdir.mkdir()
                times[monitored].append(run(monitored, args.steps, workdir, overrides))
                print(f"repeat {r} monitored={monitored}: {times[monitored][-1]}", flush=True)
    plain = statistics.median(t["fit"] for t in times[False])
    watched = statistics.median(t["fit"] for t in times[True])
    hooks = statistics.median(t["hooks"] / t["fit"] for t in times[True])
    command = " ".join(["python benchmarks/monitor_overhead.py", *(argv if argv is not None else sys.argv[1:])])
    lines = [
        f"## {schedule['log_every_n_steps']} / {schedule['image_every_n_steps']}",
        "",
        f"`{command}`: configs/demo.yaml (4 CPU ranks, bucket MGDA, ZeRO-2), {args.steps} steps, ConflictMonitor logging "
        f"every {schedule['log_every_n_steps']} steps and drawing images every {schedule['image_every_n_steps']}; "
        f"medians of {args.repeats} alternating runs.",
        "",
        "| | fit time (s) | ratio |",
        "|---|---|---|",
        f"| without ConflictMonitor | {plain:.2f} | 1.00 |",
        f"| with ConflictMonitor | {watched:.2f} | {watched / plain:.3f} |",
        "",
        f"Time rank zero's training loop spends inside the monitor's hooks: {100 * hooks:.2f}% of the fit "
        f"({statistics.median(t['hooks'] for t in times[True]):.2f} s). Runs: "
        + ", ".join(f"{t['fit']:.1f}" for t in times[False]) + " s without; " + ", ".join(f"{t['fit']:.1f}" for t in times[True]) + " s with.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:  # appended: one section per schedule
        existing = args.out.read_text() if args.out.exists() else "# ConflictMonitor's cost on the demo\n"
        args.out.write_text(existing + "\n" + text)


if __name__ == "__main__":
    main()
