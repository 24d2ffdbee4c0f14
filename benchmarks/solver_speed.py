"""Time the solvers' ``weights`` and the Gram + combine kernels, against stock averaging.

    python benchmarks/solver_speed.py                       # CPU, float32
    python benchmarks/solver_speed.py --device cuda --dtype bfloat16 --out benchmarks/results/solver_speed_cuda.md

Part 1 times every registered solver: ``solver(gram)`` for T tasks on random conflicting Grams
(median of repeats; this is per bucket and per step, and the same on every device since solvers
work on a T×T CPU copy), and ``weighting.weigh(losses, step)`` for the loss-based weightings (once
per step, not per bucket), consecutive steps on one instance so that stateful solvers run warm.
Part 2 times, for one bucket of ``--elements`` gradient entries and T tasks, the Gram matrix and
the weighted combination against the stock path (the mean of the T gradients), as ratios
measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from lightning_moo.gram import combine, gram
from lightning_moo.solvers import BUILTIN, MGDA

SOLVERS = [cls for cls in BUILTIN if cls.__name__ != "Sum"]  # Sum costs what Mean does


def median_time(fn, repeats: int, sync=lambda: None) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_gram(T: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    J = 0.3 * torch.randn(1, 256, generator=g, dtype=torch.float64) + torch.randn(T, 256, generator=g, dtype=torch.float64)
    return J @ J.T


def solver_table(tasks: list[int], repeats: int) -> tuple[list[str], list[list[str]]]:
    header = ["solver"] + [f"T={T} (ms)" for T in tasks]
    rows = []
    for cls in SOLVERS:
        row = [cls.__name__ + ("" if cls.uses_gram else " (per step, from losses)")]
        for T in tasks:
            grams = [random_gram(T, s) for s in range(repeats)]
            solver = cls()
            times = []
            for step, G in enumerate(grams):
                start = time.perf_counter()
                solver(G, step=step) if cls.uses_gram else solver.weigh(G.diagonal(), step)
                times.append(time.perf_counter() - start)
            row.append(f"{1e3 * statistics.median(times):.3f}")
        rows.append(row)
    return header, rows


def kernel_table(elements: int, T: int, device: str, dtype: torch.dtype, repeats: int) -> tuple[list[str], list[list[str]]]:
    grads = torch.randn(T, elements, device=device, dtype=dtype)
    out = torch.empty(elements, device=device, dtype=dtype)
    weights = torch.rand(T, dtype=torch.float64)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    stock = median_time(lambda: torch.mean(grads, dim=0, out=out), repeats, sync)
    t_gram = median_time(lambda: gram(grads), repeats, sync)
    t_comb = median_time(lambda: combine(weights, grads, out=out), repeats, sync)
    t_both = median_time(lambda: combine(MGDA()(gram(grads)), grads, out=out), repeats, sync)
    t_gemm = median_time(lambda: grads @ grads.T, repeats, sync)
    header = ["operation", "time (ms)", "× stock mean"]
    rows = [
        ["stock: mean of T gradients", f"{1e3 * stock:.2f}", "1.00"],
        ["one plain GEMM grads @ grads.T (reference)", f"{1e3 * t_gemm:.2f}", f"{t_gemm / stock:.2f}"],
        ["Gram matrix (T×T)", f"{1e3 * t_gram:.2f}", f"{t_gram / stock:.2f}"],
        ["combine Σ w_t g_t", f"{1e3 * t_comb:.2f}", f"{t_comb / stock:.2f}"],
        ["Gram + MGDA + combine", f"{1e3 * t_both:.2f}", f"{t_both / stock:.2f}"],
    ]
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--elements", type=int, default=50_000_000, help="bucket size for the kernel timing")
    p.add_argument("--kernel-tasks", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    p.add_argument("--out", type=Path, help="also write the tables as markdown here")
    args = p.parse_args(argv)

    console = Console()
    dtype = getattr(torch, args.dtype)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    sections = [f"Command: `python benchmarks/{Path(__file__).name} {' '.join(argv if argv is not None else sys.argv[1:])}`",
                f"Device: {device_name}; torch {torch.__version__}"]
    with console.status("timing solver.weights ..."):
        h1, r1 = solver_table(args.tasks, args.repeats)
    with console.status(f"timing Gram + combine on {args.elements:.0e} elements ..."):
        h2, r2 = kernel_table(args.elements, args.kernel_tasks, args.device, dtype, max(3, args.repeats // 4))
    for title, (h, rows) in [("solver.weights(gram), median per call", (h1, r1)),
                             (f"one bucket: {args.elements:,} elements × T={args.kernel_tasks}, {args.dtype} on {args.device}", (h2, r2))]:
        table = Table(title=title)
        for col in h:
            table.add_column(col, justify="right")
        for r in rows:
            table.add_row(*r)
        console.print(table)
        sections += [f"### {title}", markdown(h, rows)]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n\n".join(sections) + "\n")
        console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
