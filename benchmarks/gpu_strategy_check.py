"""Single-GPU check of BucketMOOStrategy's CUDA paths (NCCL, world size 1).

    python benchmarks/gpu_strategy_check.py

With one rank there is one language, so every solver's combination is that language's gradient
and the strategy must train exactly what stock DeepSpeed trains. What this exercises on CUDA:
NCCL collectives in both exchanges, the reduction stream with overlap_comm, bf16 with fp32
gradient accumulation, and the global modes. Prints one line per comparison.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "distributed"))
from toy import ToyModule, batch, named_params  # noqa: E402

from lightning_moo.solvers import CAGrad, MGDA, Mean  # noqa: E402
from lightning_moo.strategies import BucketMOOStrategy, StockDeepSpeedStrategy  # noqa: E402

STEPS = 5


class CudaToy(ToyModule):
    def training_step(self, _, batch_idx):
        x, y = batch(self.language, self.trainer.global_step)
        dtype = self.net[0].weight.dtype
        return torch.nn.functional.mse_loss(self.net(x.to(self.device, dtype)).float(), y.to(self.device))


def train(strategy, precision: str = "32-true") -> dict[str, torch.Tensor]:
    module = CudaToy(0, optimizer="adam", lr=0.01)
    pl.Trainer(accelerator="gpu", devices=1, strategy=strategy, precision=precision, max_steps=STEPS, logger=False,
               enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
               use_distributed_sampler=False).fit(module, DataLoader(range(STEPS), batch_size=None))
    return {k: v.float().cpu() for k, v in named_params(module.net).items()}


def config(overlap: bool, bf16: bool = False) -> dict:
    cfg = {"zero_optimization": {"stage": 2, "contiguous_gradients": True, "overlap_comm": overlap, "reduce_bucket_size": 600},
           "train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True}
    if bf16:
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    return cfg


def report(name: str, a: dict, b: dict) -> None:
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = max((a[k] - named_params(CudaToy(0).net)[k]).abs().max().item() for k in a)
    print(f"{name}: max |Δθ| vs stock = {diff:.3e} (parameters moved up to {moved:.3e}); bit-identical: {diff == 0.0}")


def main() -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29541")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for overlap in (False, True):
        stock = train(StockDeepSpeedStrategy(config=config(overlap)))
        for solver in (Mean(), MGDA(), CAGrad()):
            for exchange in ("sharded", "allgather"):
                moo = train(BucketMOOStrategy(solver=solver, exchange=exchange, config=config(overlap)))
                scale = 1.0 / (1 + solver.c**2) * (1 + solver.c) if isinstance(solver, CAGrad) else 1.0
                label = f"overlap={overlap} {type(solver).__name__} {exchange}"
                if scale != 1.0:
                    label += f" (CAGrad scales a single gradient by (1+c)/(1+c²)={scale:.2f}; Adam is scale-invariant up to eps)"
                report(label, moo, stock)
    stock = train(StockDeepSpeedStrategy(config=config(True, bf16=True)), "bf16-mixed")
    report("bf16 + fp32 accumulation, MGDA sharded", train(BucketMOOStrategy(solver=MGDA(), config=config(True, bf16=True)), "bf16-mixed"), stock)
    stock = train(StockDeepSpeedStrategy(config=config(False)))
    for mode in ("global", "global_two_pass"):
        report(f"mode={mode} MGDA", train(BucketMOOStrategy(solver=MGDA(), mode=mode, config=config(False))), stock)


if __name__ == "__main__":
    main()
