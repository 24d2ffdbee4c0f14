"""One short GPU check: bf16/fp32 Gram + combine accuracy on CUDA, solvers on a CUDA Gram, an NCCL
single-rank all-reduce of partial Grams (the sharded exchange's reduction), and kernel speed.

    python benchmarks/gpu_check.py --out-dir benchmarks/results
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist

from lightning_moo.gram import combine, gram
from lightning_moo.solvers import MGDA, CAGrad, PCGrad, UPGrad

import solver_speed  # noqa: E402  (same folder)


def accuracy(device: str) -> list[str]:
    lines = []
    g64 = torch.randn(8, 3_000_000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = g64 @ g64.T
    for dtype in (torch.float32, torch.bfloat16):
        g = g64.to(device=device, dtype=dtype)
        exact = g.double() @ g.double().T  # the Gram of the rounded gradients, in float64
        err = ((gram(g).cpu() - exact.cpu()).abs().max() / exact.abs().max()).item()
        w = MGDA()(gram(g))
        d = combine(w, g)
        d_ref = (w.double() @ g.double()).to(dtype)
        comb_err = ((d.double() - d_ref.double()).abs().max() / d_ref.double().abs().max()).item()
        lines.append(f"- {dtype} on {device}: Gram max rel. error vs float64 of the same values {err:.2e}; "
                     f"combine max rel. error {comb_err:.2e}; weights on {w.device} {w.dtype}")
    del ref
    return lines


def nccl_single_rank(device: str) -> list[str]:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    dist.init_process_group("nccl", rank=0, world_size=1)
    g = torch.randn(4, 1_000_000, device=device, dtype=torch.bfloat16)
    partial = sum(gram(s) for s in g.split(250_000, dim=1)).to(device)
    dist.all_reduce(partial)
    full = gram(g)
    ok = torch.allclose(partial.cpu(), full.cpu(), rtol=1e-5)  # fp32 accumulation in another order
    weights = {type(s).__name__: s(partial).tolist() for s in (MGDA(), CAGrad(), PCGrad(), UPGrad())}
    dist.destroy_process_group()
    return [f"- NCCL world_size=1 all_reduce of sliced partial Grams equals the full Gram: {ok}",
            f"- weights from the reduced Gram: {weights}"]


def compiled_combine(device: str) -> list[str]:
    """Exploration: a torch.compile'd fused combine (reads each bf16 gradient once) vs ours."""
    grads = torch.randn(8, 50_000_000, device=device, dtype=torch.bfloat16)
    w = torch.rand(8, dtype=torch.float64)
    fused = torch.compile(lambda w32, g: (w32[:, None] * g.float()).sum(0).to(g.dtype))
    w32 = w.to(device=device, dtype=torch.float32)
    out = torch.empty(grads.shape[1], device=device, dtype=grads.dtype)
    t_fused = solver_speed.median_time(lambda: fused(w32, grads), 10, torch.cuda.synchronize)
    t_ours = solver_speed.median_time(lambda: combine(w, grads, out=out), 10, torch.cuda.synchronize)
    t_mean = solver_speed.median_time(lambda: torch.mean(grads, dim=0, out=out), 10, torch.cuda.synchronize)
    err = ((fused(w32, grads).double() - combine(w, grads).double()).abs().max()).item()
    return [f"- combine, 5e7 bf16 × 8: ours {1e3 * t_ours:.2f} ms, torch.compile fused {1e3 * t_fused:.2f} ms, "
            f"stock mean {1e3 * t_mean:.2f} ms (max abs difference fused vs ours {err:.1e})"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args()
    device = "cuda"
    lines = [f"# GPU check on {torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})", ""]
    lines += accuracy(device) + nccl_single_rank(device)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    lines = compiled_combine(device)
    (args.out_dir / "gpu_check.md").write_text((args.out_dir / "gpu_check.md").read_text() + "\n".join(lines) + "\n")
    print("\n".join(lines))
    for dtype in ("bfloat16", "float32"):
        solver_speed.main(["--device", "cuda", "--dtype", dtype, "--repeats", "20", "--tasks", "2", "4", "8", "16", "32",
                           "--out", str(args.out_dir / f"solver_speed_cuda_{dtype}.md")])


if __name__ == "__main__":
    main()
