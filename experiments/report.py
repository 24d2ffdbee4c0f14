"""Tables and plots from the experiment runs' own logs.

    python -m experiments.report --out results/

Reads every finished run under ``<out>/runs/<setting>/<method>/seed<k>/`` (its TensorBoard events and
``done.json``) and writes ``<out>/results.md`` plus PNG plots next to it; and the SIB-200 runs under
``<out>/runs/sib200/<stage>/...`` (``done.json`` and every sentence's label scores,
``scores_<split>.json``) into ``<out>/sib200.md``, the per-seed CSV ``<out>/sib200_per_seed.csv`` and a
plot: label baselines, paired comparisons with their minimum detectable difference and Holm-adjusted
p-values, the learning-rate search and the truncation statistics. Over seeds, a cell is the mean ± the
half-width of the 95% confidence interval of the mean (Student t, n − 1 degrees of freedom); with one
seed only the value is shown.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
METHOD_ORDER = ["base", "mean", "bucket_mgda", "bucket_mgda_l2", "bucket_cagrad", "bucket_pcgrad", "global_mgda",
                "global_two_pass_mgda"]
METHOD_LABELS = {
    "base": "untrained", "mean": "Mean (stock)", "bucket_mgda": "bucket MGDA", "bucket_mgda_l2": "bucket MGDA-l2",
    "bucket_cagrad": "bucket CAGrad",
    "bucket_pcgrad": "bucket PCGrad", "global_mgda": "global MGDA", "global_two_pass_mgda": "global two-pass MGDA",
}
METRICS = {"acc": ("accuracy", "higher is better"), "bpb": ("bits per byte", "lower is better")}
CONFLICT = {
    "conflict/global/cosine_mean": "mean pairwise cosine",
    "conflict/global/conflict_ratio": "conflict ratio",
    "conflict/global/gap_global": "stationarity gap (global)",
    "conflict/global/gap_bucket_sum": "stationarity gap (sum of buckets)",
}


@dataclass
class RunLog:
    setting: str
    method: str
    seed: int
    seconds: float
    command: list[str]
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    wall: dict[str, list[float]] = field(default_factory=dict)  # wall-clock stamps of the scalars

    def last(self, tag: str) -> Optional[float]:
        points = self.scalars.get(tag)
        return points[-1][1] if points else None

    def at(self, tag: str, step: int) -> Optional[float]:
        return next((v for s, v in self.scalars.get(tag, []) if s == step), None)


def read_scalars(directory: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[float]]]:
    """Every scalar of the run's TensorBoard events: (step, value) pairs and their wall-clock stamps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events: dict[str, list] = {}
    for folder in sorted({p.parent for p in directory.rglob("events.out.tfevents.*")}):
        if folder.parent.name in ("language", "pair"):
            continue  # ConflictMonitor's per-language and per-pair runs share tags across languages
        accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            events.setdefault(tag, []).extend(accumulator.Scalars(tag))
    ordered_events = {tag: sorted(found, key=lambda e: (e.step, e.wall_time)) for tag, found in events.items()}
    return ({tag: [(e.step, e.value) for e in found] for tag, found in ordered_events.items()},
            {tag: [e.wall_time for e in found] for tag, found in ordered_events.items()})


def load_runs(out: Path) -> list[RunLog]:
    runs = []
    for done in sorted((out / "runs").glob("*/*/seed*/done.json")):
        directory = done.parent
        info = json.loads(done.read_text())
        scalars, wall = read_scalars(directory)
        runs.append(RunLog(directory.parents[1].name, directory.parent.name, int(directory.name[4:]),
                           info["seconds"], info["command"], scalars, wall))
    return runs


def _relative(text: str) -> str:
    """Paths as seen from the repository root (the results are read on other machines)."""
    return text.replace(str(ROOT) + "/", "").replace(str(ROOT.parent) + "/", "../")


def _plain_yaml(text: str) -> str:
    """YAML without anchors and aliases (shared lists are written out each time)."""
    import yaml

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data) -> bool:
            return True

    return yaml.dump(yaml.safe_load(text), Dumper=Dumper, sort_keys=False)


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t confidence interval (nan for one value)."""
    data = np.asarray(values, dtype=float)
    if len(data) < 2:
        return float(data.mean()), math.nan
    half = stats.t.ppf(0.975, len(data) - 1) * data.std(ddof=1) / math.sqrt(len(data))
    return float(data.mean()), float(half)


def cell(values: list[float], digits: int = 3) -> str:
    if not values:
        return "–"
    mean, half = mean_ci(values)
    return f"{mean:.{digits}f}" if math.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def ordered(methods) -> list[str]:
    return sorted(set(methods), key=lambda m: METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER))


def languages_of(runs: list[RunLog], metric: str) -> tuple[list[str], list[str]]:
    """(seen, unseen) languages in logging order, from the metric's per-language tags."""
    tags = [t for r in runs for t in r.scalars if t.startswith(f"val/{metric}_")]
    names = list(dict.fromkeys(t.split("_", 1)[1] for t in tags))
    names = [n for n in names if n not in ("seen", "unseen")]
    trained = [t.removeprefix("train/loss_") for r in runs for t in r.scalars if t.startswith("train/loss_")]
    seen = [n for n in names if n in trained]
    return seen, [n for n in names if n not in seen]


def results_table(runs: list[RunLog], metric: str) -> list[str]:
    methods = ordered(r.method for r in runs)
    seen, unseen = languages_of(runs, metric)
    if not seen and not unseen:
        return []
    rows = [(lang, f"val/{metric}_{lang}") for lang in seen] + [("**seen**", f"val/{metric}_seen")]
    rows += [(f"{lang} (unseen)", f"val/{metric}_{lang}") for lang in unseen] + [("**unseen**", f"val/{metric}_unseen")]
    name, direction = METRICS[metric]
    lines = [f"{name.capitalize()} ({direction}), final evaluation, mean ± 95% CI over seeds:", "",
             "| language | " + " | ".join(METHOD_LABELS.get(m, m) for m in methods) + " |",
             "|---" * (len(methods) + 1) + "|"]
    for label, tag in rows:
        values = [[v for r in runs if r.method == m and (v := r.last(tag)) is not None] for m in methods]
        lines.append(f"| {label} | " + " | ".join(cell(v) for v in values) + " |")
    return lines


def paired_table(runs: list[RunLog], metric: str) -> list[str]:
    """Each method minus Mean on the same seed (same data order), seen and unseen averages."""
    base = {r.seed: r for r in runs if r.method == "mean"}
    methods = [m for m in ordered(r.method for r in runs) if m not in ("mean", "base")]
    if not base or not methods or not any(f"val/{metric}_seen" in r.scalars for r in base.values()):
        return []
    lines = [f"{METRICS[metric][0].capitalize()}: method − Mean on the same seed, mean ± 95% CI over seeds:", "",
             "| | " + " | ".join(METHOD_LABELS.get(m, m) for m in methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for kind in ("seen", "unseen"):
        tag = f"val/{metric}_{kind}"
        diffs = [[r.last(tag) - base[r.seed].last(tag) for r in runs
                  if r.method == m and r.seed in base and r.last(tag) is not None and base[r.seed].last(tag) is not None]
                 for m in methods]
        lines.append(f"| {kind} | " + " | ".join(cell(d, 4) for d in diffs) + " |")
    return lines


def conflict_table(runs: list[RunLog]) -> list[str]:
    trained = [r for r in runs if r.method != "base"]
    methods = ordered(r.method for r in trained)
    if not any(tag in r.scalars for r in trained for tag in CONFLICT):
        return []
    lines = ["Gradient conflict over training (ConflictMonitor, the average over logged steps per run; "
             "mean ± 95% CI over seeds):", "", "| method | " + " | ".join(CONFLICT.values()) + " |",
             "|---" * (len(CONFLICT) + 1) + "|"]
    for m in methods:
        values = [[float(np.mean([v for _, v in r.scalars[tag]])) for r in trained if r.method == m and tag in r.scalars]
                  for tag in CONFLICT]
        lines.append(f"| {METHOD_LABELS.get(m, m)} | " + " | ".join(cell(v, 4) for v in values) + " |")
    return lines


def time_table(runs: list[RunLog]) -> list[str]:
    """Seconds per training step (from the wall-clock stamps of the per-step loss logs, so start-up,
    evaluation and the seed-0 analysis callbacks are not in it) and whole-run wall time."""
    trained = [r for r in runs if r.method != "base" and r.wall.get("train/loss")]
    methods = ordered(r.method for r in trained)

    def per_step(r: RunLog) -> float:
        stamps = r.wall["train/loss"]
        return (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)

    reference = [per_step(r) for r in trained if r.method == "mean"]
    lines = ["Time (this machine, every run alone on it; mean ± 95% CI over seeds). Step: wall clock between "
             "the first and last logged training step, per step. Run: the whole command, start-up, final "
             "evaluation and (seed 0) the silhouette / LAPE passes included:", "",
             "| method | s / step | × Mean | s / run |", "|---|---|---|---|"]
    for m in methods:
        steps = [per_step(r) for r in trained if r.method == m]
        ratio = f"{np.mean(steps) / np.mean(reference):.2f}" if reference else "–"
        lines.append(f"| {METHOD_LABELS.get(m, m)} | {cell(steps, 3)} | {ratio} | "
                     f"{cell([r.seconds for r in trained if r.method == m], 0)} |")
    return lines


# ----------------------------------------------------------------------------------------- plots
def _colors(methods: list[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    return {m: palette(METHOD_ORDER.index(m) if m in METHOD_ORDER else i) for i, m in enumerate(methods)}


def _save(figure: Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path)
    return path


def per_language_bars(runs: list[RunLog], metric: str, path: Path) -> Optional[Path]:
    seen, unseen = languages_of(runs, metric)
    languages = seen + unseen
    if not languages:
        return None
    methods = ordered(r.method for r in runs)
    colors = _colors(methods)
    figure = Figure(figsize=(max(7, 0.9 * len(languages) + 2), 4), dpi=110)
    axes = figure.add_subplot()
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        stats_ = [mean_ci([v for r in runs if r.method == m and (v := r.last(f"val/{metric}_{lang}")) is not None])
                  for lang in languages]
        means = [s[0] for s in stats_]
        errors = None if all(math.isnan(s[1]) for s in stats_) else [0 if math.isnan(s[1]) else s[1] for s in stats_]
        x = np.arange(len(languages)) + (i - (len(methods) - 1) / 2) * width
        axes.bar(x, means, width, yerr=errors, capsize=2, label=METHOD_LABELS.get(m, m), color=colors[m])
    if unseen:
        axes.axvline(len(seen) - 0.5, color="gray", linestyle="--", linewidth=1)
    axes.set_xticks(range(len(languages)), [f"{lang}\n(unseen)" if lang in unseen else lang for lang in languages],
                    fontsize="small")
    name, direction = METRICS[metric]
    axes.set_ylabel(f"{name} ({direction})")
    axes.set_title(f"{name} per language, mean ± 95% CI over seeds")
    axes.legend(fontsize="x-small", ncols=2)
    return _save(figure, path)


def training_curves(runs: list[RunLog], path: Path) -> Optional[Path]:
    trained = [r for r in runs if "train/loss" in r.scalars]
    if not trained:
        return None
    methods = ordered(r.method for r in trained)
    colors = _colors(methods)
    figure = Figure(figsize=(7, 4), dpi=110)
    axes = figure.add_subplot()
    for m in methods:
        curves = [r.scalars["train/loss"] for r in trained if r.method == m]
        length = min(len(c) for c in curves)
        steps = np.array([s for s, _ in curves[0][:length]])
        values = np.array([[v for _, v in c[:length]] for c in curves])
        mean = values.mean(0)
        axes.plot(steps, mean, label=METHOD_LABELS.get(m, m), color=colors[m], linewidth=1.2)
        if len(curves) > 1:
            axes.fill_between(steps, values.min(0), values.max(0), color=colors[m], alpha=0.15, linewidth=0)
    axes.set_xlabel("step")
    axes.set_ylabel("training loss (mean over languages, nats/token)")
    axes.set_title("Training loss: mean over seeds, band = min–max")
    axes.legend(fontsize="x-small")
    return _save(figure, path)


def per_layer(runs: list[RunLog], prefix: str, suffix: str, ylabel: str, title: str, path: Path) -> Optional[Path]:
    """Before (the untrained model, logged at step 0 of the Mean run) and after training, per layer."""
    pattern = lambda i: f"{prefix}{i}{suffix}"  # noqa: E731
    analysed = [r for r in runs if pattern(0) in r.scalars]
    if not analysed:
        return None
    layers = 0
    while any(pattern(layers) in r.scalars for r in analysed):
        layers += 1
    figure = Figure(figsize=(7, 4), dpi=110)
    axes = figure.add_subplot()
    methods = ordered(r.method for r in analysed)
    colors = _colors(methods)
    before = next((r for r in analysed if r.at(pattern(0), 0) is not None), None)
    if before is not None:
        axes.plot(range(layers), [before.at(pattern(i), 0) for i in range(layers)], color="black",
                  linestyle="--", marker="o", markersize=3, label="before (untrained)")
    for m in methods:
        run = min((r for r in analysed if r.method == m), key=lambda r: r.seed)
        after = [run.last(pattern(i)) for i in range(layers)]
        axes.plot(range(layers), after, marker="o", markersize=3, color=colors[m], label=f"after: {METHOD_LABELS.get(m, m)}")
    axes.set_xlabel("layer")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend(fontsize="x-small")
    return _save(figure, path)


# ------------------------------------------------------------------------- SIB-200: scored runs
# Files of a SIB-200 study in its results directory (experiments/run_all.py, experiments/gpu_sib200.py).
SIB200_DATA = "sib200_data.json"  # label counts and token lengths per language and split
SIB200_LR_SELECTION = "sib200_lr_selection.json"  # each method's learning rate, chosen on dev
SIB200_INVOCATION = "sib200_invocation.json"  # the command that made the runs, and where
SIB200_RESULTS = "sib200.md"
SIB200_PER_SEED = "sib200_per_seed.csv"
SCORED_METRICS = {
    "acc": ("accuracy", "higher is better"),
    "acc_norm": ("accuracy, per-byte normalised", "higher is better"),
    "bpb": ("bits per byte of the true label", "lower is better"),
}
HIGHER_IS_BETTER = {"acc": True, "acc_norm": True, "bpb": False}
# The outcomes every paired comparison tests (and Holm corrects over, all together).
OUTCOMES = [("acc", "seen"), ("acc", "unseen"), ("bpb", "seen"), ("bpb", "unseen")]
ALPHA, POWER = 0.05, 0.80


@dataclass
class ScoredRun:
    """One SIB-200 run: its settings (from done.json) and every scored sentence (scores_<split>.json)."""

    stage: str  # "grid" (scored on dev) or "test"
    method: str
    seed: int
    lr: Optional[float]
    seconds: float
    command: list[str]
    scores: dict
    info: dict = field(default_factory=dict)


def load_scored_runs(out: Path, stage: Optional[str] = None) -> list[ScoredRun]:
    """The finished SIB-200 runs under ``<out>/runs/sib200`` (of one stage, or all)."""
    runs = []
    for done in sorted((out / "runs" / "sib200").rglob("done.json")):
        info = json.loads(done.read_text())
        if stage is not None and info.get("stage") != stage:
            continue
        scores = done.parent / f"scores_{info['split']}.json"
        if not scores.is_file():
            raise FileNotFoundError(f"{done} says the run finished, but {scores.name} is missing: delete {done} to rerun it")
        runs.append(ScoredRun(info["stage"], info["method"], int(info["seed"]), info.get("lr"), float(info["seconds"]),
                              info.get("command", []), json.loads(scores.read_text()), {**info, "directory": done.parent}))
    return runs


def language_metrics(entry: dict) -> dict[str, float]:
    """Accuracy (argmin of the labels' summed NLL: the model's most likely label), accuracy with each
    label's NLL divided by its UTF-8 bytes, and bits per byte of the true label (its NLL, EOS included,
    over its bytes, summed over sentences first, as MultilingualLM's evaluation computes it)."""
    nll, nbytes = np.asarray(entry["nll"], dtype=float), np.asarray(entry["bytes"], dtype=float)
    truth = np.asarray(entry["label_index"])
    if nll.ndim != 2 or len(nll) == 0 or nll.shape != nbytes.shape or len(truth) != len(nll):
        raise ValueError(f"malformed scores: nll {nll.shape}, bytes {nbytes.shape}, labels {truth.shape}")
    rows = np.arange(len(truth))
    return {"n": len(truth), "acc": float((nll.argmin(1) == truth).mean()),
            "acc_norm": float((np.argmin(nll / np.maximum(nbytes, 1), 1) == truth).mean()),
            "bpb": float(nll[rows, truth].sum() / math.log(2) / nbytes[rows, truth].sum())}


def run_metrics(scores: dict) -> dict[str, dict[str, float]]:
    """Per language, and the unweighted mean over the seen and over the unseen languages."""
    per_language = {language: {**language_metrics(entry), "kind": entry["kind"]}
                    for language, entry in scores["languages"].items()}
    for kind in ("seen", "unseen"):
        members = [m for m in per_language.values() if m["kind"] == kind]
        if members:
            per_language[kind] = {"kind": kind, "n": sum(m["n"] for m in members),
                                  **{k: float(np.mean([m[k] for m in members])) for k in SCORED_METRICS}}
    return per_language


def per_seed_rows(runs: list[ScoredRun]) -> list[dict]:
    """One row per run and language (and the seen / unseen means): the per-seed CSV."""
    rows = []
    for r in sorted(runs, key=lambda r: (r.stage, METHOD_ORDER.index(r.method) if r.method in METHOD_ORDER else 99,
                                         r.lr or 0.0, r.seed)):
        for language, m in run_metrics(r.scores).items():
            rows.append({"stage": r.stage, "split": r.scores["split"], "method": r.method,
                         "lr": "" if r.lr is None else f"{r.lr:g}", "seed": r.seed, "language": language,
                         "kind": m["kind"], "n": m["n"], **{k: f"{m[k]:.6f}" for k in SCORED_METRICS}})
    return rows


def write_csv(rows: list[dict], path: Path) -> Path:
    import csv

    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def label_baselines(train_counts: list[int], test_labels: list[int], test_bytes: list[int],
                    labels: list[str]) -> dict[str, Any]:
    """What the labels alone give on the test sentences: always the training split's most frequent
    label; the best constant label (the test split's own majority: no constant does better); a label
    drawn from the training prior, whose expected accuracy is Σ_c p_train(c)·p_test(c); and that prior
    as a model that ignores the sentence, in bits per byte of the true label (−log₂ p_train(y) over y's
    bytes, summed over sentences first, as the models' bits per byte)."""
    train = np.asarray(train_counts, dtype=float)
    if train.sum() == 0 or not test_labels:
        raise ValueError("label baselines need training label counts and test labels")
    prior = train / train.sum()
    test = np.bincount(np.asarray(test_labels), minlength=len(labels)) / len(test_labels)
    bits = -np.log2(np.maximum(prior[np.asarray(test_labels)], 1e-300))
    majority = int(train.argmax())
    return {"majority_label": labels[majority], "majority_acc": float(test[majority]),
            "best_constant_label": labels[int(test.argmax())], "best_constant_acc": float(test.max()),
            "prior_acc": float(prior @ test), "prior_bpb": float(bits.sum() / np.sum(test_bytes))}


def mdd(sd_diff: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """Minimum detectable mean paired difference: (t_{1−α/2, n−1} + t_{power, n−1}) · sd_diff / √n,
    the usual approximation (central t quantiles) for a two-sided paired t-test at level α with the
    given power, n pairs and this standard deviation of the differences."""
    if n < 2:
        return math.nan
    return float((stats.t.ppf(1 - alpha / 2, n - 1) + stats.t.ppf(power, n - 1)) * sd_diff / math.sqrt(n))


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (nan stays nan and does not count as a test): sorted
    ascending, the k-th smallest (k = 0, 1, ...) is multiplied by m − k, made non-decreasing, capped at 1."""
    tested = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    adjusted = [math.nan] * len(pvalues)
    running = 0.0
    for k, i in enumerate(sorted(tested, key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (len(tested) - k) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def paired_comparisons(metrics: dict[tuple[str, int], dict], pairs: list[tuple[str, str]],
                       outcomes: list[tuple[str, str]] = OUTCOMES) -> list[dict]:
    """Method a minus method b on the seeds both have, for every pair and outcome (metric, seen or
    unseen): mean ± 95% CI, the paired t-test's p, its Holm-adjusted p over every test returned, the
    MDD at the observed spread, and on how many seeds a was better."""
    results = []
    for a, b in pairs:
        seeds = sorted(s for (m, s) in metrics if m == a and (b, s) in metrics)
        for metric, group in outcomes:
            if not seeds or group not in metrics[(a, seeds[0])]:
                continue
            diff = np.array([metrics[(a, s)][group][metric] - metrics[(b, s)][group][metric] for s in seeds])
            n = len(diff)
            sd = float(diff.std(ddof=1)) if n > 1 else math.nan
            if n < 2:
                p = math.nan
            elif sd == 0:
                p = 1.0 if diff[0] == 0 else 0.0  # every seed moved by the same amount
            else:
                p = float(stats.ttest_rel([metrics[(a, s)][group][metric] for s in seeds],
                                          [metrics[(b, s)][group][metric] for s in seeds]).pvalue)
            better = int(((diff > 0) if HIGHER_IS_BETTER[metric] else (diff < 0)).sum())
            results.append({"a": a, "b": b, "metric": metric, "group": group, "n": n, "mean": float(diff.mean()),
                            "ci": mean_ci(list(diff))[1], "sd": sd, "p": p, "mdd": mdd(sd, n), "better": better})
    for result, adjusted in zip(results, holm([r["p"] for r in results])):
        result["p_holm"] = adjusted
    return results


def select_learning_rates(runs: list[ScoredRun], select_by: str = "acc") -> dict[str, dict]:
    """Each method's learning rate from the grid runs (scored on dev, seen languages): the highest
    seen accuracy, ties broken by lower bits per byte (``select_by="acc"``), or the lowest seen bits
    per byte (``"bpb"``). Returns method -> {"lr", "dev": {lr: {"acc_seen", "bpb_seen"}}}."""
    if select_by not in ("acc", "bpb"):
        raise ValueError(f"select_by must be 'acc' or 'bpb', got {select_by!r}")
    if not runs:
        raise ValueError("no grid runs to choose learning rates from")
    dev: dict[str, dict[float, dict[str, float]]] = defaultdict(dict)
    for r in runs:
        seen = run_metrics(r.scores).get("seen")
        if seen is None:
            raise ValueError(f"grid run {r.method} lr {r.lr} scored no seen language")
        dev[r.method][r.lr] = {"acc_seen": seen["acc"], "bpb_seen": seen["bpb"]}

    def rank(lr_and_scores):
        scores = lr_and_scores[1]
        return (-scores["acc_seen"], scores["bpb_seen"]) if select_by == "acc" else (scores["bpb_seen"],)

    return {method: {"lr": min(by_lr.items(), key=rank)[0], "select_by": select_by,
                     "dev": {f"{lr:g}": v for lr, v in sorted(by_lr.items())}}
            for method, by_lr in dev.items()}


def _p(value: float) -> str:
    return "–" if math.isnan(value) else ("<0.001" if value < 1e-3 else f"{value:.3f}")


def sib200_tables(out: Path, runs: list[ScoredRun]) -> list[str]:
    """The markdown of a SIB-200 study: baselines, results, paired comparisons (MDD, Holm), per language,
    learning-rate search, truncation, time."""
    test = [r for r in runs if r.stage == "test"]
    trained = [r for r in test if r.method != "base"]
    methods = ordered(r.method for r in test)
    metrics = {(r.method, r.seed): run_metrics(r.scores) for r in test}
    seeds = sorted({r.seed for r in trained})
    lines: list[str] = []
    invocation = out / SIB200_INVOCATION
    if invocation.is_file():
        made = json.loads(invocation.read_text())
        lines += [f"The runs: `{made['command']}` on {made['device']}.", ""]
        if made.get("notes"):
            lines += [made["notes"], ""]
    example = next((r for r in trained if r.method == "mean"), trained[0] if trained else test[0] if test else None)
    if example is not None and example.command:
        lines += ["One run (the others differ in seed, learning rate and `strategy`):", "",
                  "    python " + _relative(" ".join(example.command)), ""]
        overrides = example.info.get("directory", Path()) / "overrides.yaml"
        if overrides.is_file():
            lines += ["<details><summary>its overrides.yaml</summary>", "", "```yaml",
                      _relative(_plain_yaml(overrides.read_text())).rstrip(), "```", "</details>", ""]
    data = json.loads((out / SIB200_DATA).read_text()) if (out / SIB200_DATA).is_file() else None
    if test:
        first = test[0].scores
        n_by_language = {lang: len(e["label_index"]) for lang, e in first["languages"].items()}
        lines += [f"Scored split: {first['split']}, sentences per language: "
                  + ", ".join(f"{lang} {n}" for lang, n in n_by_language.items())
                  + f". Seeds: {', '.join(map(str, seeds)) or '–'}. Learning rates: "
                  + (", ".join(f"{METHOD_LABELS.get(m, m)} {next(r.lr for r in trained if r.method == m):g}"
                               for m in methods if m != "base") or "–") + ".", ""]
    # Baselines from the labels alone.
    if test and data is not None:
        labels = data["labels"]
        seen_languages = [lang for lang, e in data["languages"].items() if e["kind"] == "seen" and "train" in e]
        train_counts = np.sum([data["languages"][lang]["train"]["label_counts"] for lang in seen_languages], axis=0)
        entry = next(iter(test[0].scores["languages"].values()))
        truth = entry["label_index"]
        base = label_baselines(list(train_counts), truth, [b[t] for b, t in zip(entry["bytes"], truth)], labels)
        lines += ["Baselines from the labels alone (the test labels are the same in every language, "
                  "the sentences being parallel; the prior is the training split's):", "",
                  "| baseline | accuracy | bits per byte |", "|---|---|---|",
                  f"| always the training majority ({base['majority_label']}) | {base['majority_acc']:.3f} | – |",
                  f"| best constant label on test ({base['best_constant_label']}) | {base['best_constant_acc']:.3f} | – |",
                  f"| a label drawn from the training prior (expected) | {base['prior_acc']:.3f} | – |",
                  f"| the training prior as a model (ignores the sentence) | – | {base['prior_bpb']:.3f} |",
                  f"| uniform over the {len(labels)} labels | {1 / len(labels):.3f} | – |", ""]
    if test:
        header = [(metric, group) for metric in SCORED_METRICS for group in ("seen", "unseen")]
        lines += ["Results on the scored split, mean ± 95% CI over seeds (Student t; \"untrained\": one "
                  "evaluation). Accuracy: the label with the lowest summed NLL; normalised: NLL per UTF-8 "
                  "byte of the label:", "",
                  "| method | n seeds | " + " | ".join(f"{SCORED_METRICS[m][0]}, {g}" for m, g in header) + " |",
                  "|---" * (len(header) + 2) + "|"]
        for m in methods:
            values = [[metrics[(m, s)][g][k] for s in sorted(s for (mm, s) in metrics if mm == m) if g in metrics[(m, s)]]
                      for k, g in header]
            lines.append(f"| {METHOD_LABELS.get(m, m)} | {len([r for r in test if r.method == m])} | "
                         + " | ".join(cell(v) for v in values) + " |")
        lines.append("")
    pairs = [(m, "mean") for m in methods if m not in ("mean", "base")]
    if "bucket_mgda" in methods and "global_mgda" in methods:
        pairs.append(("bucket_mgda", "global_mgda"))
    comparisons = paired_comparisons(metrics, pairs) if "mean" in methods or len(pairs) > 0 else []
    if comparisons:
        lines += [f"Paired comparisons (a − b on the same seed: same data order; the same test sentences): "
                  f"mean ± 95% CI, paired t-test p, Holm-adjusted p over all {len(comparisons)} tests of this "
                  "table, and the minimum detectable difference at the observed spread, "
                  f"MDD = (t(1−α/2, n−1) + t(power, n−1)) · sd_diff / √n with α = {ALPHA}, power = {POWER:.0%} "
                  "(two-sided paired t-test, n seeds; at the unadjusted α, so Holm's need is larger still). "
                  "A difference smaller than its MDD is one this design would usually miss, not evidence of "
                  "no difference:", "",
                  "| a − b | outcome | n seeds | difference | sd | p | p (Holm) | MDD | a better on |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for c in comparisons:
            name = f"{METHOD_LABELS.get(c['a'], c['a'])} − {METHOD_LABELS.get(c['b'], c['b'])}"
            mean = f"{c['mean']:+.4f}" if math.isnan(c["ci"]) else f"{c['mean']:+.4f} ± {c['ci']:.4f}"
            sd = "–" if math.isnan(c["sd"]) else f"{c['sd']:.4f}"
            detectable = "–" if math.isnan(c["mdd"]) else f"{c['mdd']:.4f}"
            lines.append(f"| {name} | {SCORED_METRICS[c['metric']][0].split(',')[0]}, {c['group']} | {c['n']} | {mean} | "
                         f"{sd} | {_p(c['p'])} | {_p(c['p_holm'])} | {detectable} | {c['better']} of {c['n']} |")
        lines.append("")
    if test:
        languages = list(test[0].scores["languages"])
        for metric in ("acc", "bpb"):
            lines += [f"{SCORED_METRICS[metric][0].capitalize()} per language ({SCORED_METRICS[metric][1]}), "
                      "mean ± 95% CI over seeds:", "",
                      "| language | " + " | ".join(METHOD_LABELS.get(m, m) for m in methods) + " |",
                      "|---" * (len(methods) + 1) + "|"]
            for language in languages:
                kind = test[0].scores["languages"][language]["kind"]
                values = [[metrics[(m, s)][language][metric] for (mm, s) in metrics if mm == m] for m in methods]
                label = language if kind == "seen" else f"{language} (unseen)"
                lines.append(f"| {label} | " + " | ".join(cell(v) for v in values) + " |")
            lines.append("")
    if test:
        labels = test[0].scores["labels"]
        lines += ["Predicted labels (argmin of the summed NLL), share of every scored sentence of every "
                  "language, mean over seeds; a model that predicts one label everywhere scores that label's "
                  "share of the test set:", "",
                  "| method | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
        for m in methods:
            shares = []
            for r in (r for r in test if r.method == m):
                chosen = np.concatenate([np.argmin(e["nll"], 1) for e in r.scores["languages"].values()])
                shares.append(np.bincount(chosen, minlength=len(labels)) / len(chosen))
            lines.append(f"| {METHOD_LABELS.get(m, m)} | " + " | ".join(f"{v:.3f}" for v in np.mean(shares, 0)) + " |")
        lines.append("")
    selection = out / SIB200_LR_SELECTION
    if selection.is_file():
        chosen = json.loads(selection.read_text())
        rates = sorted({lr for entry in chosen.values() for lr in entry["dev"]}, key=float)
        by = next(iter(chosen.values()))["select_by"]
        lines += [f"Learning rates searched on the dev split (seen languages, one seed; chosen by "
                  f"{'accuracy, then bits per byte' if by == 'acc' else 'bits per byte'}); cells: dev accuracy / "
                  "bits per byte, the chosen one in bold:", "",
                  "| method | " + " | ".join(f"lr {lr}" for lr in rates) + " |", "|---" * (len(rates) + 1) + "|"]
        for method in ordered(chosen):
            cells = []
            for lr in rates:
                v = chosen[method]["dev"].get(lr)
                text = "–" if v is None else f"{v['acc_seen']:.3f} / {v['bpb_seen']:.3f}"
                cells.append(f"**{text}**" if float(lr) == chosen[method]["lr"] else text)
            lines.append(f"| {METHOD_LABELS.get(method, method)} | " + " | ".join(cells) + " |")
        lines.append("")
    if data is not None:
        cuts = sorted({int(n) for e in data["languages"].values() for s in e.values() if isinstance(s, dict)
                       for n in s["truncated"]})
        lines += [f"Truncation (tokens of the longest label choice: BOS, the config's chat-formatted prompt, label, "
                  f"EOS; rows longer than a max_length lose the start of their prompt). This study's max_length: "
                  f"{data['max_length']}:", "",
                  "| language | split | rows | tokens median / p95 / max | " + " | ".join(f"cut at {n}" for n in cuts) + " |",
                  "|---" * (len(cuts) + 4) + "|"]
        for language, entry in data["languages"].items():
            for split in ("train", "validation", "test"):
                if split in entry:
                    s = entry[split]
                    label = language if entry["kind"] == "seen" else f"{language} (unseen)"
                    lines.append(f"| {label} | {split} | {s['rows']} | {s['tokens_median']:.0f} / {s['tokens_p95']:.0f} / "
                                 f"{s['tokens_max']} | " + " | ".join(f"{s['truncated'][str(n)]}" for n in cuts) + " |")
        lines.append("")
    if runs:
        lines += ["Time per run (seconds, whole run: start-up, training and scoring), mean ± 95% CI:", "",
                  "| stage | method | runs | s / run |", "|---|---|---|---|"]
        for stage in ("grid", "test"):
            for m in ordered(r.method for r in runs if r.stage == stage):
                times = [r.seconds for r in runs if r.stage == stage and r.method == m]
                lines.append(f"| {stage} | {METHOD_LABELS.get(m, m)} | {len(times)} | {cell(times, 0)} |")
        lines.append("")
    return lines


def sib200_accuracy_plot(runs: list[ScoredRun], path: Path) -> Optional[Path]:
    test = [r for r in runs if r.stage == "test"]
    if not test:
        return None
    languages = list(test[0].scores["languages"])
    methods = ordered(r.method for r in test)
    colors = _colors(methods)
    figure = Figure(figsize=(max(7, 0.9 * len(languages) + 2), 4), dpi=110)
    axes = figure.add_subplot()
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        stats_ = [mean_ci([run_metrics(r.scores)[lang]["acc"] for r in test if r.method == m]) for lang in languages]
        errors = [0 if math.isnan(s[1]) else s[1] for s in stats_]
        x = np.arange(len(languages)) + (i - (len(methods) - 1) / 2) * width
        axes.bar(x, [s[0] for s in stats_], width, yerr=errors, capsize=2, label=METHOD_LABELS.get(m, m), color=colors[m])
    kinds = [test[0].scores["languages"][lang]["kind"] for lang in languages]
    axes.set_xticks(range(len(languages)), [f"{lang}\n(unseen)" if k == "unseen" else lang for lang, k in zip(languages, kinds)],
                    fontsize="small")
    axes.set_ylabel("accuracy (higher is better)")
    axes.set_title("SIB-200 accuracy per language, mean ± 95% CI over seeds")
    axes.legend(fontsize="x-small", ncols=2)
    return _save(figure, path)


def write_sib200(out: Path, runs: Optional[list[ScoredRun]] = None) -> list[Path]:
    """``<out>/sib200.md``, the per-seed CSV and the accuracy plot of the SIB-200 runs under ``out``."""
    runs = load_scored_runs(out) if runs is None else runs
    if not runs:
        raise ValueError(f"no finished SIB-200 runs under {out / 'runs' / 'sib200'}")
    shown = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out.name
    lines = ["# SIB-200: bucket-level MOO against averaging and global MOO", "",
             f"Tables by `python -m experiments.report --out {shown}` from the runs' scored sentences "
             "(see experiments/README.md for the design and how to read it).", "", *sib200_tables(out, runs)]
    target = out / SIB200_RESULTS
    target.write_text("\n".join(lines))
    written = [target, write_csv(per_seed_rows(runs), out / SIB200_PER_SEED)]
    plot = sib200_accuracy_plot(runs, out / "sib200_acc_per_language.png")
    return written + ([plot] if plot is not None else [])


# ---------------------------------------------------------------------------------------- report
def write(out: Path) -> list[Path]:
    """``results.md`` from the TensorBoard-evaluated runs (demo), ``sib200.md`` and its CSV from the
    scored SIB-200 runs; each only where such runs exist."""
    runs = load_runs(out)
    scored = load_scored_runs(out)
    if not runs and not scored:
        raise SystemExit(f"no finished runs under {out / 'runs'}")
    written = write_sib200(out, scored) if scored else []
    if not runs:
        return written
    shown = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out.name
    lines = ["# Results", "", f"Made by `python -m experiments.report --out {shown}` from the runs' TensorBoard logs "
             "(see experiments/README.md for what was run and how to read it).", ""]
    by_setting: dict[str, list[RunLog]] = defaultdict(list)
    for r in runs:
        by_setting[r.setting].append(r)
    for setting, group in by_setting.items():
        seeds = sorted({r.seed for r in group if r.method != "base"})
        lines += [f"## {setting}", "", f"Seeds: {', '.join(map(str, seeds))}. Methods: "
                  + ", ".join(METHOD_LABELS.get(m, m) for m in ordered(r.method for r in group)) + ".", ""]
        example = next(r for r in group if r.method == "mean") if any(r.method == "mean" for r in group) else group[0]
        command = _relative(" ".join(example.command))
        lines += ["One run (the others differ in the overrides file's seeds and `strategy`):", "",
                  "    python " + command, ""]
        overrides = out / "runs" / setting / example.method / f"seed{example.seed}" / "overrides.yaml"
        if overrides.is_file():
            lines += ["<details><summary>its overrides.yaml</summary>", "", "```yaml",
                      _relative(_plain_yaml(overrides.read_text())).rstrip(), "```", "</details>", ""]
        for metric in METRICS:
            for table in (results_table(group, metric), paired_table(group, metric)):
                if table:
                    lines += table + [""]
        for table in (conflict_table(group), time_table(group)):
            if table:
                lines += table + [""]
        plots = [
            *(per_language_bars(group, metric, out / f"{setting}_{metric}_per_language.png") for metric in METRICS),
            training_curves(group, out / f"{setting}_training_curves.png"),
            per_layer(group, "silhouette/cosine/layer_", "", "silhouette (cosine) by language",
                      "Language separation per layer (seed 0)", out / f"{setting}_silhouette.png"),
            per_layer(group, "neurons/layer_", "/ratio", "share of language-specific neurons",
                      "LAPE language-specific neurons per layer (seed 0)", out / f"{setting}_lape.png"),
        ]
        for plot in plots:
            if plot is not None:
                written.append(plot)
                lines += [f"![{plot.stem}]({plot.name})", ""]
    overhead = out / "overhead.md"
    if overhead.is_file():
        lines += ["## Time, bytes and peak memory: stock vs bucket-level vs global", "",
                  *_relative(overhead.read_text()).splitlines()[2:], ""]
    target = out / "results.md"
    target.write_text("\n".join(lines))
    return [target, *written]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()
    for path in write(args.out.resolve()):
        print(path)


if __name__ == "__main__":
    main()
