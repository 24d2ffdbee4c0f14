"""Tables and plots from the experiment runs' own logs.

    python -m experiments.report --out results/

Reads every finished run under ``<out>/runs/<setting>/<method>/seed<k>/`` (its TensorBoard events and
``done.json``) and writes ``<out>/results.md`` plus PNG plots next to it. Over seeds, a cell is the
mean ± the half-width of the 95% confidence interval of the mean (Student t, n − 1 degrees of
freedom); with one seed only the value is shown.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
METHOD_ORDER = ["base", "mean", "bucket_mgda", "bucket_cagrad", "bucket_pcgrad", "global_mgda", "global_two_pass_mgda"]
METHOD_LABELS = {
    "base": "untrained", "mean": "Mean (stock)", "bucket_mgda": "bucket MGDA", "bucket_cagrad": "bucket CAGrad",
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


# ---------------------------------------------------------------------------------------- report
def write(out: Path) -> list[Path]:
    runs = load_runs(out)
    if not runs:
        raise SystemExit(f"no finished runs under {out / 'runs'}")
    written: list[Path] = []
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
