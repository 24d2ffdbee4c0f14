"""The prepared one-GPU SIB-200 study runs end to end (its CPU smoke mode): every method on two seeds,
the untrained model, the report's tables and per-seed CSV, the numbers in the CSV recomputed from the
scored sentences, and a second invocation that reruns nothing."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "gpu_sib200.py"
METHODS = ["mean", "bucket_mgda", "bucket_mgda_l2", "global_mgda"]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_gpu_sib200_smoke_mode(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, str(SCRIPT), "--smoke", "--out", str(out)]
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=380)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    runs = {(d["method"], d["seed"]): (path.parent, d) for path in out.glob("runs/sib200/test/**/done.json")
            if (d := json.loads(path.read_text()))}
    assert set(runs) == {("base", 0)} | {(m, s) for m in METHODS for s in (0, 1)}
    # Every run in this one process freed its DeepSpeed engine (device memory, on a GPU) before the next.
    assert all(d["engines_alive"] == 0 for _, d in runs.values()), {k: d["engines_alive"] for k, (_, d) in runs.items()}
    rows = list(csv.DictReader(open(out / "sib200_per_seed.csv")))
    languages = 11  # the config's 8 seen and 3 unseen languages, plus the seen and unseen means per run
    assert len(rows) == len(runs) * (languages + 2)
    # The CSV's accuracy and bits per byte, recomputed from one run's scored sentences.
    directory, _ = runs[("bucket_mgda", 1)]
    scores = json.loads((directory / "scores_test.json").read_text())
    for language, entry in scores["languages"].items():
        nll, truth = np.array(entry["nll"]), np.array(entry["label_index"])
        assert nll.shape == (6, 7)  # 6 sentences (smoke), 7 labels
        true_bytes = np.array(entry["bytes"])[np.arange(6), truth]
        row = next(r for r in rows if r["method"] == "bucket_mgda" and r["seed"] == "1" and r["language"] == language)
        assert float(row["acc"]) == pytest.approx((nll.argmin(1) == truth).mean(), abs=1e-6)
        assert float(row["bpb"]) == pytest.approx(nll[np.arange(6), truth].sum() / np.log(2) / true_bytes.sum(), rel=1e-5)
    # Different solvers, different updates: MGDA's weights are not Mean's.
    first_scores = [json.loads((runs[(m, 0)][0] / "scores_test.json").read_text()) for m in ("mean", "bucket_mgda")]
    assert first_scores[0]["languages"]["eng_Latn"]["nll"] != first_scores[1]["languages"]["eng_Latn"]["nll"]

    text = (out / "sib200.md").read_text()
    for needed in ["Baselines from the labels alone", "| bucket MGDA-l2 − Mean (stock) | accuracy, seen | 2 |",
                   "| bucket MGDA − global MGDA |", "MDD", "p (Holm)", "Truncation", "python experiments/gpu_sib200.py --smoke"]:
        assert needed in text, needed
    assert json.loads((out / "sib200_data.json").read_text())["max_length"] == 1024

    # Resumable: a second invocation finds every run done and only rewrites the report.
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/**/done.json")}
    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=200)
    assert second.returncode == 0, second.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
