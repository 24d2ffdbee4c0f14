"""The experiment runner and its report: confidence intervals against closed forms, and a smoke run
of the offline demo setting (one seed, a few steps, every method) checked against the runs' own logs."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from experiments import report, run_all

ROOT = Path(__file__).resolve().parents[1]

SENTENCES = {  # a SIB-200-shaped directory for the silhouette / LAPE callbacks (4 parallel sentences)
    "deu_Latn": ["Der Zug fährt um acht Uhr ab.", "Das Spiel endete unentschieden.", "Die Wahl findet im Mai statt.", "Der Arzt empfiehlt viel Wasser."],
    "rus_Cyrl": ["Поезд отправляется в восемь часов.", "Матч закончился вничью.", "Выборы пройдут в мае.", "Врач советует пить много воды."],
    "jpn_Jpan": ["列車は八時に出発します。", "試合は引き分けに終わった。", "選挙は五月に行われる。", "医者は水をたくさん飲むように勧める。"],
    "fra_Latn": ["Le train part à huit heures.", "Le match s'est terminé par un nul.", "L'élection a lieu en mai.", "Le médecin conseille de boire beaucoup d'eau."],
}


def test_confidence_interval_is_the_student_t_interval():
    # [1, 2, 3]: mean 2, sample sd 1, t(0.975, 2) = 4.302653 → half-width 4.302653 / √3 = 2.484138.
    mean, half = report.mean_ci([1.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0)
    assert half == pytest.approx(2.4841377, abs=1e-6)
    # Five values with sd 0: no spread, zero width; one value: no interval at all.
    assert report.mean_ci([0.5] * 5) == (pytest.approx(0.5), pytest.approx(0.0))
    assert math.isnan(report.mean_ci([0.7])[1])
    assert report.cell([0.7]) == "0.700"
    assert report.cell([1.0, 2.0, 3.0]) == "2.000 ± 2.484"


def test_every_setting_plans_each_method_and_seed_once(tmp_path):
    parsed = run_all.parse_args(["--out", str(tmp_path), "--settings", "demo", "--seeds", "3", "4"])
    runs = run_all.plan(parsed)
    assert sorted((r.method, r.seed) for r in runs) == sorted((m, s) for m in run_all.METHODS for s in (3, 4))
    assert len({r.directory for r in runs}) == len(runs)
    for run in runs:
        assert run.config["seed_everything"] == run.seed and run.config["data"]["seed"] == run.seed
        assert run.config["strategy"]["init_args"] == run_all.METHODS[run.method]


def _sib_like(directory: Path) -> Path:
    for language, sentences in SENTENCES.items():
        (directory / language).mkdir(parents=True)
        rows = ["index_id\tcategory\ttext"] + [f"{i}\ttravel\t{s}" for i, s in enumerate(sentences)]
        (directory / language / "dev.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return directory


def _printed_metric(log: str, tag: str) -> float:
    """The value Lightning's end-of-run summary printed for ``tag`` (stdout, not TensorBoard)."""
    return float(re.findall(rf"{re.escape(tag)}\s*│\s*([0-9.]+)", log)[-1])


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_smoke_run_of_the_demo_setting(tmp_path):
    out = tmp_path / "results"
    command = [sys.executable, "-m", "experiments.run_all", "--out", str(out), "--smoke", "--settings", "demo",
               "--sib200", str(_sib_like(tmp_path / "sib"))]
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=800)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    runs = report.load_runs(out)
    assert sorted(r.method for r in runs) == sorted(run_all.METHODS)
    languages = ["deu", "rus", "jpn", "hin", "fra", "kor"]
    for run in runs:
        for language in languages:
            assert math.isfinite(run.last(f"val/bpb_{language}")), (run.method, language)
        # The report reads TensorBoard; the run's own printed summary must say the same.
        printed = _printed_metric((out / "runs" / "demo" / run.method / "seed0" / "log.txt").read_text(), "val/bpb_seen")
        assert run.last("val/bpb_seen") == pytest.approx(printed, abs=6e-5)
    by_method = {r.method: r for r in runs}
    # The two global modes are two implementations of the same update: same metrics.
    for language in languages:
        tag = f"val/bpb_{language}"
        assert by_method["global_mgda"].last(tag) == pytest.approx(by_method["global_two_pass_mgda"].last(tag), rel=1e-4)
    # MGDA's weights differ from Mean's uniform ones, so the trained models differ.
    assert by_method["bucket_mgda"].last("val/bpb_seen") != by_method["mean"].last("val/bpb_seen")

    results = (out / "results.md").read_text()
    for label in report.METHOD_LABELS.values():
        if label != "untrained":
            assert label in results
    mean_seen = f"| **seen** | {by_method['mean'].last('val/bpb_seen'):.3f} |"
    assert mean_seen in results
    assert "global_two_pass MGDA" in (out / "overhead.md").read_text()
    for name in ["bpb_per_language", "training_curves", "silhouette", "lape"]:
        image = imread(out / f"demo_{name}.png")
        assert image.ndim == 3 and image.shape[0] > 100 and np.ptp(image) > 0, name

    # Resumable: a second invocation finds every run done and reruns none of them.
    logs = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/*/log.txt")}
    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"{len(runs)} runs, {len(runs)} already done" in second.stdout
    assert {p: p.stat().st_mtime_ns for p in logs} == logs


def _run(method, seed, seen, unseen):
    scalars = {"train/loss_deu": [(0, 1.0)], "val/bpb_deu": [(9, seen)], "val/bpb_fra": [(9, unseen)],
               "val/bpb_seen": [(9, seen)], "val/bpb_unseen": [(9, unseen)]}
    return report.RunLog("toy", method, seed, 1.0, [], scalars)


def test_tables_aggregate_over_seeds_and_pair_each_method_with_mean_on_its_seed():
    runs = [_run("mean", s, seen, 5.0) for s, seen in enumerate([1.0, 2.0, 3.0])]
    runs += [_run("bucket_mgda", s, seen, 4.0 + s) for s, seen in enumerate([1.5, 2.5, 3.5])]
    assert report.languages_of(runs, "bpb") == (["deu"], ["fra"])
    table = "\n".join(report.results_table(runs, "bpb"))
    assert "| **seen** | 2.000 ± 2.484 | 2.500 ± 2.484 |" in table  # t(0.975, 2)·1/√3 = 2.484
    assert "| fra (unseen) | 5.000 ± 0.000 | 5.000 ± 2.484 |" in table
    paired = "\n".join(report.paired_table(runs, "bpb"))
    # Per seed: 0.5, 0.5, 0.5 (seen) and -1, 0, 1 (unseen): the pairing removes the seed effect.
    assert "| seen | 0.5000 ± 0.0000 |" in paired
    assert "| unseen | 0.0000 ± 2.4841 |" in paired
    assert report.paired_table(runs, "acc") == []  # no accuracy logged: no table
