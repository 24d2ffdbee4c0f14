"""The prepared GPU check of the solve-on-device path runs end to end (its CPU smoke mode)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_no_stall.py"


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_gpu_no_stall_smoke_mode(tmp_path):
    out = tmp_path / "report.md"
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], capture_output=True, text=True, timeout=380)
    assert done.returncode == 0, done.stderr[-3000:]
    # Every configuration's DeepSpeed engine is gone once it has run (its hooks would otherwise keep it alive).
    progress = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"name"')]
    assert len(progress) == 9 and all(p["engines_alive"] == 0 for p in progress), progress
    rows = {line.split("|")[1].strip(): line.split("|") for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line}
    solvers = ["Mean, stash in host memory", "MGDA on device", "MGDA on host", "CAGrad on device", "CAGrad on host"]
    assert {"stock", "stock, a backward per language", "stock, four backward passes, three discarded", "Mean", *solvers} <= set(rows)
    for name in ["Mean", *solvers]:
        buckets = int(rows[name][2])
        assert buckets > 1, f"{name}: the model was not split into several buckets"
        assert float(rows[name][5]) > 0  # a step time was measured
        # The synchronisation watches were wired in: every bucket's reduction of one step, and the
        # four backward passes (three stashed languages, one into the buckets) of another.
        watched = rows[name][3].strip()
        assert watched.startswith("n/a (") and int(watched[5:-1]) >= buckets, watched
        assert rows[name][4].strip() == "n/a (4)"
    assert rows["stock"][4].strip() == "n/a (1)"
    # Stock with a backward per language runs its four backward passes through stock's own reductions.
    per_language = rows["stock, a backward per language"]
    assert per_language[2].strip() == "-" and per_language[4].strip() == "n/a (4)" and float(per_language[5]) > 0
    # The timing floor: four backward passes (three of them unseen by DeepSpeed) and stock's one reduction per bucket.
    floor = rows["stock, four backward passes, three discarded"]
    assert floor[2].strip() == "-" and floor[3].strip() == rows["stock"][3].strip() and floor[4].strip() == "n/a (4)"
    for name in ["stock", "Mean", *solvers]:  # × four backward passes: the ratio of the step times, to their rounding
        step, base = float(rows[name][5]), float(floor[5])
        assert float(rows[name][8]) == pytest.approx(step / base, abs=0.005 + step / base * (0.0005 / step + 0.0005 / base))
    # The device path trains what the host path trains (to rounding), for both solvers.
    diffs = [float(part.split()[0]) for part in out.read_text().split("max relative |Δθ| = ")[1:]]
    assert len(diffs) == 2 and max(diffs) < 1e-4
    # The stash in host memory goes there and back unchanged: the same parameters as Mean's.
    assert "Mean, stash in host memory vs Mean after 7 steps: max |Δθ| = 0.00e+00" in out.read_text()
    # The solver and kernel tables measured on the same device come with it.
    text = out.read_text()
    assert "### On-device solvers" in text and "| MGDA | operators per call" in text
    assert "| Grams of the " in text and "| the same, one gram() per parameter |" in text
