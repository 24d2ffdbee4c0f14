"""Start one worker process per rank on 127.0.0.1 (gloo) and collect their results."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

WORKER = Path(__file__).with_name("worker.py")
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def _start(scenario: Path, out: Path, world_size: int, timeout: float) -> tuple[list[int], str]:
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = dict(
            os.environ,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world_size),
            NODE_RANK="0",
            OMP_NUM_THREADS="1",
            PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        )
        log = open(out / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen([sys.executable, str(WORKER), str(scenario)], env=env, stdout=log, stderr=subprocess.STDOUT), log))
    try:
        for proc, _ in procs:
            proc.wait(timeout=timeout)
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    logs = "\n".join(f"--- rank {r} ---\n" + (out / f"rank{r}.log").read_text()[-4000:] for r in range(world_size))
    return [proc.returncode for proc, _ in procs], logs
