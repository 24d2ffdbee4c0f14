"""Faults a cluster causes, one at a time, on ``lightning-moo fit`` with 2 gloo ranks and a tiny model:
preemption (SIGTERM to the launcher, to every rank, from outside), a rank killed, a rank that raises,
a rank that stops answering, a kill during a checkpoint save. Each asserts the exit status, a time
bound, the message, and that no checkpoint was lost: a resumed run ends where an uninterrupted one does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "distributed"))
from test_cli import LANGUAGES, REPO, cli_env, config, scalars  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
STEPS = 6
PREEMPTED = 143


def fault_config(out: Path, run: str, *callbacks: dict, steps: int = STEPS, strategy_args: dict | None = None) -> Path:
    path = config(out, run, extra_callbacks=callbacks)
    cfg = yaml.safe_load(path.read_text())
    cfg["trainer"]["max_steps"] = steps
    cfg["trainer"]["default_root_dir"] = str(out)
    cfg["trainer"]["callbacks"][0]["init_args"]["save_last"] = True
    if strategy_args:
        cfg["strategy"]["init_args"].update(strategy_args)
    path.write_text(yaml.safe_dump(cfg))
    return path


def callback(name: str, **init_args) -> dict:
    return {"class_path": f"fault_callbacks.{name}", "init_args": init_args}


class Run:
    """``lightning-moo ARGS`` in its own session, output to a file (so that waiting for the launcher
    does not also wait for ranks that still hold a pipe)."""

    def __init__(self, out: Path, *args: str) -> None:
        env = cli_env(HERE)  # fault_callbacks importable
        self.log = out / f"output_{len(list(out.glob('output_*')))}.txt"
        self.start = time.monotonic()
        with self.log.open("w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "lightning_moo.cli", *args], env=env, cwd=REPO,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout: float = 240, ranks_ended: bool = True) -> tuple[int, str, float]:
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            seconds = time.monotonic() - self.start
            alive = group_alive(self.proc.pid)
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        output = self.log.read_text()
        assert not (alive and ranks_ended), f"ranks were still running when the launcher returned:\n{output[-3000:]}"
        return code, output, seconds


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def assert_same_training(reference: Path, resumed: Path, ref_logs: Path, new_logs: Path, from_step: int) -> None:
    expected, got = torch.load(reference), torch.load(resumed)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    before, after = scalars(ref_logs), scalars(new_logs)
    for language in LANGUAGES:
        tag = f"train/loss_{language}"
        for step in range(from_step, max(before[tag]) + 1):
            assert after[tag][step] == before[tag][step], (tag, step)


def checkpoint_step(path: Path) -> int:
    states = torch.load(path / "checkpoint" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return states["global_step"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    code, output, _ = Run(out, "fit", "--config", str(fault_config(out, "straight", steps=10))).wait()
    assert code == 0, output[-3000:]
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("ranks, times", [([0], 1), ([0, 1], 1), ([1, 0], 2)], ids=["launcher", "every_rank", "every_rank_twice"])
def test_sigterm_checkpoints_the_agreed_step_exits_143_and_resumes_exactly(straight, tmp_path, ranks, times):
    """SIGTERM to the launcher alone, or to every rank (twice each: the scheduler's and a forwarded
    one): no deadlock, a checkpoint of the step all ranks finished, status 143, then an exact resume."""
    run = Run(tmp_path, "fit", "--config", str(fault_config(tmp_path, "run", callback("SignalAt", step=3, ranks=ranks, times=times), steps=10)))
    code, output, seconds = run.wait(timeout=120)
    assert code == PREEMPTED, output[-3000:]
    assert seconds < 90, f"took {seconds:.0f} s"
    assert "preempted: stopped after step 4" in output and output.count("preempted: stopped") == 1
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert checkpoint_step(last) == 4
    code, output, _ = Run(tmp_path, "fit", "--config", str(fault_config(tmp_path, "run", steps=10)), "--ckpt_path", "last").wait()
    assert code == 0, output[-3000:]
    assert_same_training(straight / "straight.pt", tmp_path / "run.pt", straight / "logs" / "straight" / "version_0",
                         tmp_path / "logs" / "run" / "version_0", from_step=4)


@pytest.mark.timeout(300)
def test_sigterm_from_outside_to_every_process_mid_run(straight, tmp_path):
    run = Run(tmp_path, "fit", "--config", str(fault_config(tmp_path, "run", callback("Slow", seconds=0.5), steps=10)))
    heartbeat = None
    while heartbeat is None or json.loads(heartbeat.read_text())["step"] < 2:
        assert run.proc.poll() is None, run.log.read_text()[-3000:]
        time.sleep(0.2)
        heartbeat = next(tmp_path.glob(".lightning_moo/*/heartbeat-rank0.json"), None)
    os.killpg(run.proc.pid, signal.SIGTERM)  # what a scheduler does: every process of the job
    sent = time.monotonic()
    code, output, _ = run.wait(timeout=120)
    assert code == PREEMPTED, output[-3000:]
    assert time.monotonic() - sent < 60
    step = checkpoint_step(tmp_path / "checkpoints" / "last.ckpt")
    assert 2 <= step < 10
    code, output, _ = Run(tmp_path, "fit", "--config", str(fault_config(tmp_path, "run", steps=10)), "--ckpt_path", "last").wait()
    assert code == 0, output[-3000:]
    assert_same_training(straight / "straight.pt", tmp_path / "run.pt", straight / "logs" / "straight" / "version_0",
                         tmp_path / "logs" / "run" / "version_0", from_step=step)


def failure_report(output: str) -> list[str]:
    assert output.count("lightning-moo: the run failed") == 1, output[-4000:]
    return output.split("lightning-moo: the run failed", 1)[1].strip().splitlines()


@pytest.mark.timeout(300)
def test_a_killed_rank_is_named_and_the_job_ends(tmp_path):
    code, output, seconds = Run(tmp_path, "fit", "--config", str(fault_config(
        tmp_path, "run", callback("SignalAt", step=3, ranks=[1], signal="SIGKILL")))).wait(timeout=120)
    assert code == 1, output[-3000:]
    assert seconds < 60
    report = failure_report(output)
    assert any(line.strip() == "rank 1 (rus): killed by SIGKILL" for line in report), report


@pytest.mark.timeout(300)
def test_an_error_on_one_rank_is_reported_once_with_its_rank_and_language(tmp_path):
    code, output, seconds = Run(tmp_path, "fit", "--config", str(fault_config(
        tmp_path, "run", callback("RaiseAt", step=3, rank=1, message="bad batch in rus")))).wait(timeout=120)
    assert code == 1, output[-3000:]
    assert seconds < 60
    report = failure_report(output)
    assert "rank 1 (rus): ValueError: bad batch in rus" in [line.strip() for line in report], report
    assert output.count("ValueError: bad batch in rus") == 2  # the traceback's last line and the report's
    assert "Connection reset" not in output and "Traceback" in output and output.count("Traceback") == 1


@pytest.mark.timeout(300)
def test_a_stopped_rank_ends_the_job_after_the_timeout_and_is_named(tmp_path):
    code, output, seconds = Run(tmp_path, "fit", "--config", str(fault_config(
        tmp_path, "run", callback("SignalAt", step=3, ranks=[1], signal="SIGSTOP"),
        strategy_args={"timeout": "0:00:15"}))).wait(timeout=180)
    assert code == 1, output[-3000:]
    assert seconds < 120
    report = failure_report(output)
    assert any(line.strip().startswith("rank 1 (rus): stopped") for line in report), report


@pytest.mark.timeout(300)
def test_a_kill_during_a_checkpoint_save_leaves_the_previous_checkpoint_whole(straight, tmp_path):
    code, output, _ = Run(tmp_path, "fit", "--config", str(fault_config(
        tmp_path, "run", callback("KillDuringSave", step=4), steps=10))).wait(timeout=120, ranks_ended=False)
    assert code != 0 and code != PREEMPTED, output[-3000:]
    last = tmp_path / "checkpoints" / "last.ckpt"
    # The step-4 save of last.ckpt died after its first file: last.ckpt is still step 2, every file of it.
    assert checkpoint_step(last) == 2
    shards = sorted(p.name for p in (last / "checkpoint").glob("zero_pp_rank_*_optim_states.pt"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    code, output, _ = Run(tmp_path, "fit", "--config", str(fault_config(tmp_path, "run", steps=10)), "--ckpt_path", str(last)).wait()
    assert code == 0, output[-3000:]
    assert_same_training(straight / "straight.pt", tmp_path / "run.pt", straight / "logs" / "straight" / "version_0",
                         tmp_path / "logs" / "run" / "version_0", from_step=2)


@pytest.mark.timeout(300)
def test_a_diverged_language_is_named_by_its_code_once(tmp_path):
    """Rank 1's weights turn NaN: every rank raises the same error (the bucket's Gram is all-reduced),
    and the report gives it once, naming the language, not an index."""
    code, output, seconds = Run(tmp_path, "fit", "--config", str(fault_config(
        tmp_path, "run", callback("PoisonAt", step=3, rank=1)))).wait(timeout=120)
    assert code == 1, output[-3000:]
    report = failure_report(output)
    errors = [line for line in report if "FloatingPointError" in line]
    assert len(errors) == 1 and errors[0].strip().startswith("ranks 0, 1 (deu, rus): FloatingPointError"), report
    assert "language rus" in errors[0] and "language deu" not in errors[0], errors
