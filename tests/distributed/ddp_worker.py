"""One rank of a DDP test: ``worker.py``'s runs, with DDP strategies besides the DeepSpeed ones.

Usage: ``python ddp_worker.py SCENARIO.json``, started like ``worker.py``. A run's ``strategy`` is
``"ddp"`` (BucketMOODDPStrategy), ``"ddp_stock"`` (Lightning's DDPStrategy) or anything
``worker.make_strategy`` builds; ``ddp`` holds extra DDPStrategy arguments (``bucket_cap_mb``, ...),
``fp16_scaler: true`` trains in fp16 with a GradScaler.
"""

from __future__ import annotations

import copy

import worker
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy

from lightning_moo.strategies import BucketMOODDPStrategy


class Recorder(worker.Recorder):
    """worker.Recorder, also recording the buckets of BucketMOODDPStrategy."""

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if (batch_idx + 1) % self.accumulate == 0 and hasattr(trainer.strategy, "buckets"):
            self.buckets.append(copy.deepcopy(trainer.strategy.buckets))


def make_strategy(spec: dict):
    kind, ddp = spec.get("strategy", "ddp"), dict(spec.get("ddp", {}))
    if spec.get("fp16_scaler"):
        # Given to the strategy, since Trainer(precision="16-mixed") turns into bf16 on CPU.
        ddp["precision_plugin"] = MixedPrecision("16-mixed", device="cpu")
    if kind == "ddp_stock":
        return DDPStrategy(**ddp)
    if kind == "ddp":
        return BucketMOODDPStrategy(
            solver=worker.make_solver(spec["solver"]), exchange=spec.get("exchange", "sharded"), languages=spec.get("languages"),
            target_buckets=spec.get("target_buckets"), **ddp
        )
    return _deepspeed_strategy(spec)


_deepspeed_strategy = worker.make_strategy
# worker.run looks both names up when it runs: the rest of a run (data, trainer, resume, errors,
# results) stays exactly worker.py's.
worker.make_strategy, worker.Recorder = make_strategy, Recorder

if __name__ == "__main__":
    worker.main()
