"""Time the solvers on four families of Gram matrices, the Gram + combine kernels, and (with
``--vs-torchjd``) the same methods in TorchJD on the same Jacobians.

    python benchmarks/solver_speed.py --out benchmarks/results/solver_speed_cpu.md
    python benchmarks/solver_speed.py --device cuda --dtype bfloat16 --out benchmarks/results/solver_speed_cuda.md
    python benchmarks/solver_speed.py --vs-torchjd --out benchmarks/results/solver_speed_vs_torchjd_cpu.md

The Jacobians J (T × 2000, float64) come in four families: ``random`` (a weak shared component
plus noise), ``hard-conflict`` (a strong shared component, negated and halved for half of the
tasks: J[T//2:] gets -0.5 times it), ``rank-deficient`` (T gradients in max(1, T//2) dimensions) and
``ill-conditioned`` (singular values 1 … 1e-8).

Part 1 times every registered solver: the whole call ``solver(gram)`` (validation, float64 copy
and dtype round trip included) for T tasks, one Jacobian per repeat (median; this is per bucket
and per step, and the same on every device since solvers work on a T×T CPU copy), consecutive
steps on one instance so that stateful solvers run warm; ``weighting.weigh(losses, step)`` for the
loss-based weightings (once per step, not per bucket), on random instances only. Part 2 times, for
one bucket of ``--elements`` gradient entries and T tasks, the Gram matrix (of the bucket, and of
each of its parameters, shaped as in a Llama layer) and the weighted combination against the stock
path (the mean of the T gradients), as ratios measured in the same run; for float32 also the T×n
block of one rank training T languages in bf16 (T − 1 gradients stashed in bf16 parameter by
parameter, the last in the fp32 bucket) assembled both ways: converted then concatenated, as before,
and converted into place, as the exchange does now.

``--on-device`` instead counts and times the solvers that solve on the gradients' device
(``weights_on_device``: MGDA and CAGrad by enumeration, no host read), per bucket: the operators one
call dispatches (on CUDA each non-view operator is a kernel launch the host pays for while the
backward waits for its own launches) and the host time of one call; with ``--device cuda`` also the
time until its kernels have finished, and both for the call captured once as a CUDA graph and
replayed (the fix to try if launches still dominate).

``--vs-torchjd`` (needs ``pip install -e .[bench]``) instead times, on the same J, what an update
costs each library: ours ``w = solver(J @ J.T); w @ J``, TorchJD's ``aggregator(J)`` (which forms
the Gramian, solves and combines), alternating the two call by call; TorchJD's MGDA is
Frank–Wolfe to 1e-3 (inexact), its UPGrad/DualProj use quadprog, its CAGrad and NashMTL cvxpy.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_moo.exchange import PieceRows
from lightning_moo.gram import combine, gram, piece_grams
from lightning_moo.solvers import BUILTIN, MGDA, CAGrad

SOLVERS = [cls for cls in BUILTIN if cls.__name__ != "Sum"]  # Sum costs what Mean does
FAMILIES = ("random", "hard-conflict", "rank-deficient", "ill-conditioned")
DIM = 2000


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


def jacobian(family: str, T: int, seed: int) -> torch.Tensor:
    """One T × DIM float64 Jacobian of ``family`` (see the module docstring)."""
    rng = np.random.default_rng([seed, T, FAMILIES.index(family)])
    if family == "random":
        J = 0.3 * rng.normal(size=(1, DIM)) + rng.normal(size=(T, DIM))
    elif family == "hard-conflict":
        shared = 2.0 * rng.normal(size=(1, DIM))
        J = shared + rng.normal(size=(T, DIM))
        J[T // 2:] -= 1.5 * shared  # the shared component times -0.5 for half of the tasks
    elif family == "rank-deficient":
        r = max(1, T // 2)
        J = rng.normal(size=(T, r)) @ rng.normal(size=(r, DIM))
    else:
        U, _ = np.linalg.qr(rng.normal(size=(T, T)))
        V, _ = np.linalg.qr(rng.normal(size=(DIM, T)))
        J = (U * np.logspace(0, -8, T)) @ V.T
    return torch.from_numpy(J)


def solver_table(family: str, tasks: list[int], repeats: int) -> tuple[list[str], list[list[str]]]:
    header = ["solver"] + [f"T={T} (ms)" for T in tasks]
    rows = []
    for cls in SOLVERS:
        if not cls.uses_gram and family != "random":
            continue
        row = [cls.__name__ + ("" if cls.uses_gram else " (per step, from losses)")]
        for T in tasks:
            grams = [(lambda J: J @ J.T)(jacobian(family, T, s)) for s in range(repeats)]
            solver = cls()
            times = []
            for step, G in enumerate(grams):
                start = time.perf_counter()
                solver(G, step=step) if cls.uses_gram else solver.weigh(G.diagonal(), step)
                times.append(time.perf_counter() - start)
            row.append(f"{1e3 * statistics.median(times):.3f}")
        rows.append(row)
    return header, rows


def llama_pieces(elements: int, hidden: int = 2048, mlp: int = 5632) -> list[tuple[int, int]]:
    """Element ranges of the parameters of a bucket of ``elements`` filled with Llama layers (a norm,
    four attention matrices, three MLP matrices, in turn), the last one cut where the bucket ends."""
    sizes = [hidden] + [hidden * hidden] * 4 + [hidden * mlp] * 3
    pieces, start = [], 0
    while start < elements:
        for size in sizes:
            end = min(start + size, elements)
            if start < end:
                pieces.append((start, end))
            start = end
    return pieces


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
    pieces = llama_pieces(elements)
    t_pieces = median_time(lambda: piece_grams(grads, 0, pieces), repeats, sync)
    t_each = median_time(lambda: [gram(grads[:, a:b]) for a, b in pieces], repeats, sync)
    header = ["operation", "time (ms)", "× stock mean"]
    rows = [
        ["stock: mean of T gradients", f"{1e3 * stock:.2f}", "1.00"],
        ["one plain GEMM grads @ grads.T (reference)", f"{1e3 * t_gemm:.2f}", f"{t_gemm / stock:.2f}"],
        ["Gram matrix (T×T)", f"{1e3 * t_gram:.2f}", f"{t_gram / stock:.2f}"],
        [f"Grams of the {len(pieces)} parameters (what the exchanges compute)", f"{1e3 * t_pieces:.2f}", f"{t_pieces / stock:.2f}"],
        ["the same, one gram() per parameter", f"{1e3 * t_each:.2f}", f"{t_each / stock:.2f}"],
        ["combine Σ w_t g_t", f"{1e3 * t_comb:.2f}", f"{t_comb / stock:.2f}"],
        ["Gram + MGDA + combine", f"{1e3 * t_both:.2f}", f"{t_both / stock:.2f}"],
    ]
    if dtype == torch.float32:
        rows += _stash_rows(grads, pieces, stock, repeats, sync)
    return header, rows


def _stash_rows(grads: torch.Tensor, pieces: list[tuple[int, int]], stock: float, repeats: int, sync) -> list[list[str]]:
    """One rank training T languages in bf16 with fp32 gradient accumulation: T − 1 bf16 gradients
    stashed parameter by parameter and the fp32 bucket, assembled into the T×n block the exchange
    works on, both ways: each piece converted, then all concatenated; each converted into place."""
    stashed = PieceRows([[(a, row[a:b]) for a, b in pieces] for row in grads[:-1].to(torch.bfloat16)] + [[(0, grads[-1])]])
    block = torch.empty(grads.numel(), device=grads.device, dtype=grads.dtype)
    views = [piece for row in stashed.rows for _, piece in row]
    t_cat = median_time(lambda: torch.cat([v.to(grads.dtype) for v in views], out=block), repeats, sync)
    t_write = median_time(lambda: stashed.write(block, 0, grads.shape[1]), repeats, sync)
    return [
        ["T rows, T − 1 of them stashed in bf16: pieces converted, then concatenated", f"{1e3 * t_cat:.2f}", f"{t_cat / stock:.2f}"],
        ["the same, converted into place (PieceRows.write)", f"{1e3 * t_write:.2f}", f"{t_write / stock:.2f}"],
    ]


#: Operators that only make a view (no kernel, no memory traffic): counted apart from the rest.
VIEW_OPS = frozenset({"view", "_unsafe_view", "as_strided", "permute", "transpose", "t", "unsqueeze", "squeeze",
                      "expand", "select", "slice", "diagonal", "alias", "detach", "lift_fresh", "_reshape_alias",
                      "split", "unbind"})


class OperatorCount(TorchDispatchMode):
    """Counts the ATen operators dispatched inside the block, views apart."""

    def __init__(self) -> None:
        super().__init__()
        self.views = self.others = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__.rstrip("_") in VIEW_OPS:
            self.views += 1
        else:
            self.others += 1
        return func(*args, **(kwargs or {}))


def on_device_table(tasks: list[int], repeats: int, device: str) -> tuple[list[str], list[list[str]]]:
    """Per on-device solver and T: operators per call (non-view + view), host µs per call, and on
    CUDA µs until the call's kernels finish, and the same for the call captured as a CUDA graph;
    medians over ``repeats`` hard-conflict Grams."""
    from lightning_moo.solvers.on_device import MAX_TASKS

    tasks = [T for T in tasks if T <= MAX_TASKS]
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    header = ["solver", "measure"] + [f"T={T}" for T in tasks]
    rows = []
    for name, solver in (("MGDA", MGDA()), ("CAGrad(c=0.5)", CAGrad(c=0.5))):
        ops, host, done, graphs = [], [], [], []
        for T in tasks:
            grams = [(J @ J.T).to(device) for J in (jacobian("hard-conflict", T, s) for s in range(repeats))]
            solver.weights_on_device(grams[0])  # builds the systems' constants once per T and device
            with OperatorCount() as count:
                solver.weights_on_device(grams[0])
            ops.append(f"{count.others} + {count.views}")
            launch, finish = _timed(solver.weights_on_device, grams, sync)
            host.append(f"{1e6 * launch:.0f}")
            done.append(f"{1e6 * finish:.0f}")
            if cuda:
                graphs.append(_graph_cell(solver.weights_on_device, grams, sync))
        rows += [[name, "operators per call (non-view + view)", *ops], [name, "host µs per call", *host]]
        if cuda:
            rows += [[name, "µs until its kernels finish", *done],
                     [name, "as a CUDA graph: host µs / µs until finished per call", *graphs]]
    return header, rows


def _timed(call, grams: list[torch.Tensor], sync) -> tuple[float, float]:
    """Median seconds of ``call(G)`` on the host, and until its kernels have finished, over ``grams``."""
    launch, finish = [], []
    for G in grams:
        sync()
        start = time.perf_counter()
        call(G)
        launch.append(time.perf_counter() - start)
        sync()
        finish.append(time.perf_counter() - start)
    return statistics.median(launch), statistics.median(finish)


def _graph_cell(solve, grams: list[torch.Tensor], sync) -> str:
    """``solve`` captured once as a CUDA graph, then per call: the Gram copied into the captured
    input, a replay, the output cloned (what the library would pay per bucket if it adopted graphs).
    Whether the replays give the eager call's bits; a capture that fails says why."""
    try:
        static_in = grams[0].clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # outside the capture: library handles, workspaces, cached constants
                solve(static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = solve(static_in)

        def replay(gram: torch.Tensor) -> torch.Tensor:
            static_in.copy_(gram)
            graph.replay()
            return static_out.clone()

        same = all(torch.equal(replay(G), solve(G)) for G in grams)
        launch, finish = _timed(replay, grams, sync)
    except Exception as error:  # reported in the table: the eager rows stand on their own
        return f"capture failed ({type(error).__name__}: {str(error)[:80]})".replace("|", "/")
    return f"{1e6 * launch:.0f} / {1e6 * finish:.0f}" + ("" if same else " (other bits than eager)")


#: The methods both libraries have, as the tables label them (hyperparameters in brackets).
TORCHJD_METHODS = ("MGDA", "CAGrad(c=0.5)", "UPGrad", "DualProj", "PCGrad", "IMTLG", "AlignedMTL", "NashMTL",
                   "GradVac(beta=0.01)", "FairGrad(alpha=2)", "ConFIG")


def method_name(label: str) -> str:
    """``CAGrad(c=0.5)`` → ``CAGrad``: what ``--methods`` takes."""
    return label.split("(")[0]


def torchjd_pairs(T: int) -> list[tuple[str, object, object]]:
    """(label, our solver, TorchJD's aggregator) for each of :data:`TORCHJD_METHODS`, in its order,
    with the hyperparameters its label names."""
    from torchjd import aggregation as tjd

    from lightning_moo import solvers as ours

    pairs = [
        (ours.MGDA(), tjd.MGDA()),
        (ours.CAGrad(c=0.5), tjd.CAGrad(c=0.5)),
        (ours.UPGrad(), tjd.UPGrad()),
        (ours.DualProj(), tjd.DualProj()),
        (ours.PCGrad(), tjd.PCGrad()),
        (ours.IMTLG(), tjd.IMTLG()),
        (ours.AlignedMTL(), tjd.AlignedMTL()),
        (ours.NashMTL(), tjd.NashMTL(n_tasks=T)),
        (ours.GradVac(beta=0.01), tjd.GradVac(beta=0.01)),
        (ours.FairGrad(alpha=2.0), tjd.FairGrad(alpha=2.0)),
        (ours.ConFIG(), tjd.ConFIG()),
    ]
    return [(label, *pair) for label, pair in zip(TORCHJD_METHODS, pairs, strict=True)]


def torchjd_table(family: str, tasks: list[int], repeats: int, methods: list[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """Per method (all, or those named in ``methods``) and T: ``ours / TorchJD ms (ratio)``, medians
    over ``repeats`` Jacobians of the faster of three calls, the two libraries called alternately."""
    header = ["method"] + [f"T={T}: ours / TorchJD ms (ratio)" for T in tasks]
    cells: dict[str, list[str]] = {}
    for T in tasks:
        Js = [jacobian(family, T, s) for s in range(repeats)]
        for name, solver, aggregator in torchjd_pairs(T):
            if methods and method_name(name) not in methods:
                continue
            ours_t, theirs_t = [], []
            for step, J in enumerate(Js):
                # The faster of three alternating calls per Jacobian: on shared cores a call is
                # sometimes descheduled for milliseconds, which says nothing about either library.
                ours, theirs = [], []
                for _ in range(3):
                    start = time.perf_counter()
                    solver(J @ J.T, step=step) @ J
                    ours.append(time.perf_counter() - start)
                    start = time.perf_counter()
                    try:
                        aggregator(J)
                    except Exception:  # TorchJD's QP solvers can fail on degenerate Gramians
                        break
                    theirs.append(time.perf_counter() - start)
                ours_t.append(min(ours))
                if len(theirs) == 3:
                    theirs_t.append(min(theirs))
            a = 1e3 * statistics.median(ours_t)
            if theirs_t:
                b = 1e3 * statistics.median(theirs_t)
                cell = f"{a:.3f} / {b:.3f} ({a / b:.2f}×)" + ("" if len(theirs_t) == len(Js) else f" [TorchJD failed {len(Js) - len(theirs_t)}/{len(Js)}]")
            else:
                cell = f"{a:.3f} / failed"
            cells.setdefault(name, []).append(cell)
    return header, [[name, *row] for name, row in cells.items()]


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--elements", type=int, default=50_000_000, help="bucket size for the kernel timing")
    p.add_argument("--kernel-tasks", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--on-device", action="store_true", help="count and time the solvers that solve on --device instead")
    p.add_argument("--vs-torchjd", action="store_true", help="compare with TorchJD instead (pip install -e .[bench])")
    p.add_argument("--methods", nargs="+", help="with --vs-torchjd: only these methods (e.g. IMTLG DualProj)")
    p.add_argument("--out", type=Path, help="also write the tables as markdown here")
    args = p.parse_args(argv)
    known = [method_name(label) for label in TORCHJD_METHODS]
    if args.methods and not set(args.methods) <= set(known):
        p.error(f"unknown --methods {sorted(set(args.methods) - set(known))}; choose from {known}")

    console = Console()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    versions = f"torch {torch.__version__}, NumPy {np.__version__}"
    tables = []
    if args.on_device:
        with console.status("counting and timing the on-device solvers ..."):
            tables.append((f"on-device solvers on {args.device}: one call per bucket, hard-conflict Grams, median of {args.repeats}",
                           on_device_table(args.tasks, args.repeats, args.device)))
    elif args.vs_torchjd:
        versions += f", TorchJD {importlib.metadata.version('torchjd')}"
        for family in args.families:
            with console.status(f"timing ours and TorchJD on {family} Jacobians ..."):
                tables.append((f"{family}: J @ J.T + solver + w @ J (ours) vs aggregator(J) (TorchJD), "
                               f"T × {DIM} float64, median ms", torchjd_table(family, args.tasks, args.repeats, args.methods)))
    else:
        for family in args.families:
            with console.status(f"timing solver(gram) on {family} Grams ..."):
                tables.append((f"{family}: solver(gram), median ms per call", solver_table(family, args.tasks, args.repeats)))
        with console.status(f"timing Gram + combine on {args.elements:.0e} elements ..."):
            tables.append((f"one bucket: {args.elements:,} elements × T={args.kernel_tasks}, {args.dtype} on {args.device}",
                           kernel_table(args.elements, args.kernel_tasks, args.device, dtype, max(3, args.repeats // 4))))
    sections = [f"Command: `python benchmarks/{Path(__file__).name} {' '.join(argv if argv is not None else sys.argv[1:])}`",
                f"Device: {device_name}; {versions}"]
    for title, (h, rows) in tables:
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
