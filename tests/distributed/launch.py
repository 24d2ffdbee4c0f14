"""Start one worker process per rank on 127.0.0.1 (gloo) and collect their results.

The ranks are forked from a server process that has already imported torch, Lightning, DeepSpeed
and transformers (``multiprocessing``'s forkserver, started once per test session): a fresh
interpreter spends ~7 s of CPU importing them, per rank and per test. The server never computes,
so forking it is safe, and each rank then runs its worker script as ``__main__``, as
``python WORKER SCENARIO`` would, with its own environment and log.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.forkserver
import os
import runpy
import socket
import sys
import time
from pathlib import Path

import torch

WORKER = Path(__file__).with_name("worker.py")
REPO = Path(__file__).resolve().parents[2]
# What the workers import; the server imports it once (a module missing here is skipped).
PRELOAD = ["torch", "torch.distributed", "lightning.pytorch", "lightning.pytorch.loggers", "deepspeed", "transformers",
           "peft", "lightning_moo.strategies", "lightning_moo.callbacks", "launch"]
_context = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(target, world_size: int, out: Path, timeout: float = 180) -> None:
    """Run ``target(rank, port, out)`` in ``world_size`` spawned processes, all given the same free
    port for their gloo group on 127.0.0.1; fail if a rank fails or they are not all done within
    ``timeout`` seconds (one deadline for all, so hung ranks fail the test instead of stalling it)."""
    context = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [context.Process(target=target, args=(rank, port, str(out))) for rank in range(world_size)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.join(timeout=max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()
    assert [proc.exitcode for proc in procs] == [0] * world_size, "a rank failed or hung (its traceback is above)"


def run_ranks(runs: list[dict], out: Path, world_size: int = 2, timeout: float = 240) -> dict[str, list[dict]]:
    """Run ``runs`` in ``world_size`` fresh processes; return ``{run name: [result of rank 0, 1, ...]}``."""
    scenario = out / "scenario.json"
    scenario.write_text(json.dumps({"runs": runs, "out": str(out)}))
    # free_port() releases the port before rank 0 binds it; another process may take it meanwhile.
    for attempt in range(3):
        codes, logs = _start(scenario, out, world_size, timeout)
        if not any(codes):
            break
        if "address already in use" not in logs.lower():
            raise RuntimeError(f"a worker failed (exit codes {codes}):\n{logs}")
    else:
        raise RuntimeError(f"no free port after 3 attempts:\n{logs}")
    return {
        spec["name"]: [torch.load(out / f"{spec['name']}_rank{r}.pt", weights_only=False) for r in range(world_size)]
        for spec in runs
    }


def _forkserver():
    """The forkserver context, its server started with one OpenMP thread (the thread count is read
    once, when torch loads) and this directory and the repository importable (as for a worker
    script run by path)."""
    global _context
    if _context is None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        saved = dict(os.environ)
        os.environ.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), str(REPO), os.environ.get("PYTHONPATH", "")]))
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        _context = context
    return _context


def _rank_main(worker: str, argv: list[str], env: dict[str, str], log: str) -> None:
    """In the forked rank: this rank's environment and log, then the worker script as ``__main__``."""
    os.environ.clear()
    os.environ.update(env)
    # Lightning read the rank from the environment when the server imported it (as rank 0).
    from lightning.fabric.utilities.rank_zero import _get_rank, rank_zero_only

    rank_zero_only.rank = _get_rank()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    sys.path[:0] = [str(Path(worker).parent), str(REPO)]
    sys.argv = [worker, *argv]
    runpy.run_path(worker, run_name="__main__")


def _start(scenario: Path, out: Path, world_size: int, timeout: float) -> tuple[list[int], str]:
    port = free_port()
    context = _forkserver()
    procs = []
    for rank in range(world_size):
        # This process's environment (a test may have set variables for the workers), not the server's.
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE=str(world_size), NODE_RANK="0", OMP_NUM_THREADS="1")
        proc = context.Process(target=_rank_main, args=(str(WORKER), [str(scenario)], env, str(out / f"rank{rank}.log")))
        proc.start()
        procs.append(proc)
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        hung = [rank for rank, proc in enumerate(procs) if proc.is_alive()]
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
    logs = "\n".join(f"--- rank {r} ---\n" + (out / f"rank{r}.log").read_text()[-4000:] for r in range(world_size))
    if hung:
        raise TimeoutError(f"rank(s) {hung} still running after {timeout:.0f} s, killed:\n{logs}")
    return [proc.exitcode for proc in procs], logs
