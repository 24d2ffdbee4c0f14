"""When a rank fails, dies or hangs: the job ends, and one report says which rank, which languages and why.

Every rank writes what it knows to a folder the ranks share (``<default_root_dir>/.lightning_moo/
<run>``): a heartbeat per step, and a failure record when it raises. One process reports, once:

* the launching process of ``lightning-moo fit --trainer.devices=N`` (Lightning's subprocess launcher),
  whose watcher thread also notices a child that exits with an error or is killed, while the launcher
  itself may be blocked in a collective; it kills the other ranks and exits with status 1;
* ranks started by torchrun or SLURM: each rank with an error of its own reports it; global rank 0
  reports ranks it lost contact with, from their heartbeats.

A rank that stopped answering (SIGSTOP, a hang) is found when the collectives time out (the
strategies' ``timeout``, 10 minutes by default): the report names the ranks whose heartbeat fell behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from lightning.pytorch.callbacks import Callback

# Messages of errors that a rank raises because another rank failed, not because of its own state.
PEER_ERROR_MARKERS = (
    "connection reset", "connection closed", "broken pipe", "timed out", "timeout", "socket", "ncclremoteerror",
    "connection refused", "gloo", "nccl communicator was aborted",
)
# How long the reporter waits for the other ranks' failure records before it reports.
RECORD_GRACE_S = 2.0
# The pid of the process the user started; the ranks Lightning's launcher starts inherit it.
LAUNCHER_PID = "LIGHTNING_MOO_LAUNCHER_PID"


def mark_launcher() -> bool:
    """Note this process as the launcher for the ranks it will start (they inherit the environment);
    True if it did (then :func:`unmark_launcher` at its end: a test that runs the CLI in its own
    process must not pass the mark on to the runs it starts later)."""
    if LAUNCHER_PID in os.environ:
        return False
    os.environ[LAUNCHER_PID] = str(os.getpid())
    return True


def unmark_launcher() -> None:
    os.environ.pop(LAUNCHER_PID, None)


def is_launched_child() -> bool:
    """A rank started by Lightning's launcher (not by the user, torchrun or SLURM): it leaves
    reporting to the launcher."""
    return os.environ.get(LAUNCHER_PID, str(os.getpid())) != str(os.getpid())


@dataclass
class RunContext:
    """What the reporter needs, filled in once the trainer knows its ranks and languages."""

    folder: Path
    rank: int
    world_size: int
    languages: dict[int, list[str]]
    children: list[subprocess.Popen] = field(default_factory=list)  # the launcher's child ranks
    trainer: object = None
    reported: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def child_ranks(self) -> dict[int, subprocess.Popen]:
        """The launcher's children by global rank: the launcher is its node's local rank 0."""
        return {self.rank + i + 1: proc for i, proc in enumerate(self.children)}

    def describe(self, rank: int) -> str:
        names = self.languages.get(rank)
        return f"rank {rank} ({', '.join(names)})" if names else f"rank {rank}"


CONTEXT: Optional[RunContext] = None
# Set by the CLI: prints the run summary (logs, checkpoints, last metrics) before a failure report.
SUMMARIZE = None


def run_folder(root: str) -> Path:
    """One folder per run, the same on every rank: the rendezvous port tells concurrent runs apart."""
    run = f"{os.environ.get('MASTER_ADDR', 'local')}_{os.environ.get('MASTER_PORT', os.getpid())}"
    return Path(root) / ".lightning_moo" / run


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + f".{os.getpid()}.tmp")
    partial.write_text(json.dumps(data))
    os.replace(partial, path)  # a reader never sees half a record


def read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class Heartbeat(Callback):
    """Knows the run's ranks and languages for the failure report, and records each rank's step.

    ``lightning-moo`` adds it unless the config has one. Costs one tiny file write per rank and step.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        global CONTEXT
        layout = getattr(trainer.strategy, "layout", None) or getattr(trainer.datamodule, "layout", None)
        languages = {}
        if layout is not None:
            languages = {r: [layout.names[t] for t in layout.languages_of(r)] for r in range(trainer.world_size)}
        children = CONTEXT.children if CONTEXT is not None else []
        CONTEXT = RunContext(run_folder(trainer.default_root_dir), trainer.global_rank, trainer.world_size,
                             languages, children, trainer=trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if CONTEXT is not None:
            write_json(CONTEXT.folder / f"heartbeat-rank{CONTEXT.rank}.json", {"step": trainer.global_step, "time": time.time()})

    def teardown(self, trainer, pl_module, stage: str) -> None:
        """A run that ended normally leaves nothing behind (failure records stay, for the post-mortem)."""
        if CONTEXT is None:
            return
        (CONTEXT.folder / f"heartbeat-rank{CONTEXT.rank}.json").unlink(missing_ok=True)
        for folder in (CONTEXT.folder, CONTEXT.folder.parent):
            try:
                folder.rmdir()  # only when empty: another rank or a failure record may still be there
            except OSError:
                break


def is_peer_error(error: BaseException) -> bool:
    """A rank's error that only says another rank went away or stopped answering."""
    text = f"{type(error).__name__}: {error}".lower()
    return type(error).__name__ in ("DistBackendError", "DistNetworkError") or any(m in text for m in PEER_ERROR_MARKERS)


def fail(error: BaseException) -> None:
    """Record this rank's error, report (if this process reports), end the job; exits with status 1."""
    context = CONTEXT
    if context is None or (context.world_size == 1 and not context.children):
        raise error  # one process, or before any rank knew the run: an ordinary Python error
    record = {"rank": context.rank, "step": _step(context), "peer": is_peer_error(error),
              "error": f"{type(error).__name__}: {error}", "traceback": "".join(traceback.format_exception(error))}
    write_json(context.folder / f"failure-rank{context.rank}.json", record)
    # The launcher reports for all; a rank started by torchrun or SLURM reports its own error, and
    # global rank 0 the ranks it lost; a child of the launcher leaves it to the launcher.
    if not is_launched_child() and (context.children or not record["peer"] or context.rank == 0):
        report_once(context, time.monotonic() + RECORD_GRACE_S)
    _end(context, 1)


def report_once(context: RunContext, deadline: float) -> None:
    """Print the report unless another thread did; a second caller (the main thread and the watcher
    both notice a dead rank) waits until the first has printed it, so that neither exits mid-report."""
    with context.lock:
        if not context.reported:
            _report(context, deadline)
            context.reported = True


def _report(context: RunContext, deadline: float) -> None:
    children = context.child_ranks()
    records = _records(context, deadline, expect={context.rank, *children})
    causes = [r for r in records.values() if not r["peer"]]
    lines = []
    by_error: dict[str, list[int]] = {}  # the same error on several ranks (a bad config, a diverged step): one line
    for r in sorted(records):
        if not records[r]["peer"]:
            by_error.setdefault(records[r]["error"].splitlines()[0][:500], []).append(r)
    for error, ranks in by_error.items():
        who = context.describe(ranks[0]) if len(ranks) == 1 else _describe_ranks(context, ranks)
        lines.append(f"  {who}: {error}")
    for r, proc in children.items():
        if r not in records or records[r]["peer"]:
            state = _child_state(proc)
            if state:
                lines.append(f"  {context.describe(r)}: {state}")
    described = {r for r in records if not records[r]["peer"]} | {r for r, proc in children.items() if _child_state(proc)}
    lines += [line for r, line in _behind(context) if r not in described]
    if not lines:
        lines.append("  no rank reported an error of its own: a rank was lost (see its log) or the network failed")
    if SUMMARIZE is not None and context.trainer is not None:
        try:
            SUMMARIZE(context.trainer)
        except Exception:  # the summary must never hide the failure
            pass
    out = sys.stderr
    if causes:
        first = min(causes, key=lambda r: r["rank"])
        out.write(f"--- the error of {context.describe(first['rank'])} ---\n{first['traceback']}")
    step = max((r["step"] for r in records.values() if r.get("step") is not None), default=None)
    where = f" at step {step}" if step is not None else ""
    out.write(f"lightning-moo: the run failed{where} ({context.world_size} ranks):\n" + "\n".join(lines) + "\n")
    out.flush()


def _describe_ranks(context: RunContext, ranks: list[int]) -> str:
    names = [name for r in ranks for name in context.languages.get(r, [])]
    return f"ranks {', '.join(map(str, ranks))}" + (f" ({', '.join(names)})" if names else "")


def _records(context: RunContext, deadline: float, expect: set[int]) -> dict[int, dict]:
    """Failure records of the ranks, waiting until ``deadline`` for those still missing (a launcher's
    child that is still running or that exited with an error may yet write one)."""
    while True:
        records = {}
        for path in context.folder.glob("failure-rank*.json"):
            record = read_json(path)
            if record is not None:
                records[record["rank"]] = record
        pending = [r for r in expect if r not in records and _may_still_write(context, r)]
        if not pending or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def _may_still_write(context: RunContext, rank: int) -> bool:
    if rank == context.rank:
        return False
    if not context.children:
        return True
    proc = context.child_ranks().get(rank)
    return proc is not None and proc.poll() is None and _child_state(proc) is None


def _child_state(proc: subprocess.Popen) -> Optional[str]:
    """A launcher child that died by a signal or is stopped, in words; None otherwise."""
    code = proc.poll()
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    try:
        state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
    return "stopped (it received SIGSTOP or SIGTSTP) and stopped answering" if state in ("T", "t") else None


def _behind(context: RunContext) -> list[tuple[int, str]]:
    """Ranks whose heartbeat stopped before the others': the silent ones of a collective timeout."""
    beats = {}
    for r in range(context.world_size):
        beat = read_json(context.folder / f"heartbeat-rank{r}.json")
        if beat is not None:
            beats[r] = beat
    if len(beats) < 2:
        return []
    latest = max(b["step"] for b in beats.values())
    return [(r, f"  {context.describe(r)}: silent since step {b['step']} ({time.time() - b['time']:.0f} s ago) "
                f"while the others reached step {latest}")
            for r, b in sorted(beats.items()) if b["step"] < latest]


def _step(context: RunContext) -> Optional[int]:
    return getattr(context.trainer, "global_step", None)


def _end(context: RunContext, status: int) -> None:
    """Kill the launcher's children (they may be blocked in a collective) and exit at once: a normal
    exit would run Lightning's and the process group's teardown, which can block on the dead peer."""
    for proc in context.children:
        if proc.poll() is None:
            proc.kill()
    for proc in context.children:
        proc.wait()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def watch_children(child_processes: list[subprocess.Popen]) -> None:
    """Replaces Lightning's child-process observer (which SIGKILLs everything, reporting nothing, when a
    child fails): a thread in the launcher that, when a child exits with an error or is killed, reports
    and ends the job."""
    global CONTEXT
    if CONTEXT is None:
        CONTEXT = RunContext(Path(".lightning_moo"), 0, len(child_processes) + 1, {})
    CONTEXT.children = child_processes

    def watch() -> None:
        while True:
            time.sleep(0.5)
            codes = [proc.poll() for proc in child_processes]
            if all(code == 0 for code in codes):
                return
            if any(code not in (None, 0) for code in codes):
                report_once(CONTEXT, time.monotonic() + RECORD_GRACE_S)
                _end(CONTEXT, 1)

    threading.Thread(target=watch, name="lightning-moo-rank-watcher", daemon=True).start()


def exit_status_when_preempted(status: int) -> int:
    """The launcher (or a rank torchrun/SLURM started) exits with ``status``; a child of the launcher
    with 0, so that it is not mistaken for a failed rank while the launcher finishes."""
    return 0 if is_launched_child() else status


def wait_for_children(timeout_s: float = 120.0) -> None:
    """At the end of a successful launcher: the shell gets its prompt back only after every rank ended."""
    if CONTEXT is None:
        return
    deadline = time.monotonic() + timeout_s
    for proc in CONTEXT.children:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
