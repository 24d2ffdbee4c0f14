"""The benchmark scripts still run (CPU, tiny sizes): their numbers are measured elsewhere."""

import importlib.util
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_solver_speed_times_every_registered_solver(tmp_path):
    from lightning_moo.solvers import BUILTIN

    out = tmp_path / "speed.md"
    load("solver_speed").main(["--tasks", "2", "3", "--repeats", "2", "--elements", "1000", "--kernel-tasks", "2", "--out", str(out)])
    text = out.read_text()
    timed = [line.split("|")[1].split("(")[0].strip() for line in text.splitlines() if line.startswith("| ")]
    assert {cls.__name__ for cls in BUILTIN} - {"Sum"} <= set(timed)  # Sum costs what Mean does
    # The bucket kernels, float32 by default: with the assembly of bf16-stashed rows both ways.
    assert {"Gram matrix", "T rows, T − 1 of them stashed in bf16: pieces converted, then concatenated",
            "the same, converted into place"} <= set(timed)


def test_solver_speed_counts_and_times_the_on_device_solvers(tmp_path):
    bench = load("solver_speed")
    x = torch.arange(6.0)
    with bench.OperatorCount() as count:
        x.view(2, 3).t() * 2  # two views, one kernel
    assert (count.others, count.views) == (1, 2)
    out = tmp_path / "on_device.md"
    bench.main(["--on-device", "--tasks", "2", "13", "--repeats", "2", "--out", str(out)])
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| MGDA") or line.startswith("| CAGrad")]
    assert [r[0].strip() for r in rows] == ["MGDA", "MGDA", "CAGrad(c=0.5)", "CAGrad(c=0.5)"]
    assert all(len(r) == 3 for r in rows), "T = 13 is beyond enumeration and must be left out"
    others, views = (int(n) for n in rows[0][2].split("+"))
    assert others > 0 and views >= 0 and float(rows[1][2]) > 0
    if not torch.cuda.is_available():  # a capture that fails is reported in its cell, not raised
        from lightning_moo.solvers import MGDA

        cell = bench._graph_cell(MGDA().weights_on_device, [torch.eye(3, dtype=torch.float64)], lambda: None)
        assert cell.startswith("capture failed (")


def test_overhead_pairs_each_round_with_its_own_baseline():
    overhead = load("overhead")
    steps = {"stock ZeRO-2": [1.0, 2.0, 1.0], "bucket MGDA sharded": [1.1, 2.0, 0.9]}
    runs = {name: [{"step_s": t} for t in times] for name, times in steps.items()}
    # Round ratios 1.1, 1.0, 0.9: the median of the medians (1.0 / 1.0) would hide the spread.
    assert overhead._step_ratio(runs, "bucket MGDA sharded") == "1.00 (0.90–1.10)"
    assert overhead._step_ratio({k: v[:1] for k, v in runs.items()}, "bucket MGDA sharded") == "1.10"


def test_solver_speed_refuses_a_method_it_does_not_compare(capsys):
    with pytest.raises(SystemExit) as exit_:
        load("solver_speed").main(["--vs-torchjd", "--methods", "IMTLG", "IMTL"])
    assert exit_.value.code == 2
    assert "unknown --methods ['IMTL']" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_monitor_overhead_trains_the_demo_with_and_without_the_monitor(tmp_path):
    out = tmp_path / "monitor.md"
    load("monitor_overhead").main(["--repeats", "1", "--steps", "6", "--out", str(out)])
    rows = [line for line in out.read_text().splitlines() if line.startswith("| with")]
    assert len(rows) == 2 and all(float(row.split("|")[2]) > 0 for row in rows)
