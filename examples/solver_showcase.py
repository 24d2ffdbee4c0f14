"""Solver showcase: how each solver combines four conflicting "language" gradients.

    python examples/solver_showcase.py [--tasks 4] [--dim 64] [--seed 0]

Draws T gradients that share a direction but conflict pairwise, then prints for every solver the
weights, the cosine between its update d and each task gradient (negative = that task's loss goes
up to first order), and ‖d‖. Runs offline in about a second.
"""

from __future__ import annotations

import argparse

import torch
from rich.console import Console
from rich.table import Table

from lightning_moo.solvers import MGDA, AlignedMTL, CAGrad, DualProj, IMTLG, Mean, NashMTL, PCGrad, UPGrad


def conflicting_gradients(tasks: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(dim, generator=g, dtype=torch.float64)
    own = torch.randn(tasks, dim, generator=g, dtype=torch.float64) * 2.0
    scales = torch.logspace(0, 1, tasks, dtype=torch.float64)[:, None]  # norms differ up to 10×
    return (0.3 * shared + own) * scales


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    J = conflicting_gradients(args.tasks, args.dim, args.seed)
    G = J @ J.T
    unit = J / J.norm(dim=1, keepdim=True)
    cos = unit @ unit.T
    pairs = [(i, j) for i in range(args.tasks) for j in range(i + 1, args.tasks)]
    conflicts = sum(float(cos[i, j]) < 0 for i, j in pairs)

    console = Console(width=max(Console().width, 110))
    console.print(f"[bold]{args.tasks} task gradients[/] in R^{args.dim}, norms "
                  f"{[round(float(n), 1) for n in J.norm(dim=1)]}; {conflicts}/{len(pairs)} pairs conflict (cos < 0)")
    table = Table(title="solver → weights, and cos(d, g_t) per task")
    for col in ["solver", "weights", "cos(d, g_t)", "‖d‖", "conflicts"]:
        table.add_column(col, justify="right")
    for solver in [Mean(), MGDA(), CAGrad(), PCGrad(), IMTLG(), UPGrad(), DualProj(), AlignedMTL(), NashMTL()]:
        w = solver(G)
        d = w @ J
        cosines = unit @ d / d.norm().clamp_min(1e-300)
        table.add_row(
            type(solver).__name__,
            " ".join(f"{x:+.3f}" for x in w.tolist()),
            " ".join(f"{x:+.2f}" for x in cosines.tolist()),
            f"{float(d.norm()):.2f}",
            str(int((cosines < 0).sum())),
        )
    console.print(table)


if __name__ == "__main__":
    main()
