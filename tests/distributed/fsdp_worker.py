"""One rank of an FSDP test: ``worker.py``'s runs with FSDP2 strategies.

Usage: ``python fsdp_worker.py SCENARIO.json``, started like ``worker.py``. A run's ``strategy`` is
``"fsdp"`` (BucketMOOFSDPStrategy) or ``"fsdp_stock"`` (Lightning's ModelParallelStrategy); ``fsdp``
holds extra strategy arguments (``units``, ``cpu_offload``, ...). The toy module shards each Linear
layer and then itself in ``configure_model`` unless the strategy is given ``units`` (it then shards
them itself). Parameters are recorded whole (gathered from their shards).
"""

from __future__ import annotations

import copy
import os

import lightning.pytorch as pl
import torch
import worker
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from toy import ToyModule

from lightning_moo.strategies import BucketMOOFSDPStrategy

WORLD = int(os.environ.get("WORLD_SIZE", 1))  # read now: a finished run's teardown clears it


def named_params(net: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole: an all-gather of its shards, which every rank runs in the same order."""
    return {f"net.{n}": (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in net.named_parameters()}


class FSDPToy(ToyModule):
    def configure_model(self):
        if getattr(self.trainer.strategy, "units", None) is not None:
            return  # the strategy shards them
        mesh = self.device_mesh["data_parallel"]
        # Every Linear (with LoRA: peft's wrapper, its frozen base layer and its adapters), inner ones
        # first; the root then holds nothing: training_step calls self.net, not the root's forward.
        for layer in reversed(list(self.net.modules())):
            if type(layer).__name__ == "Linear":
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)


class Recorder(worker.Recorder):
    """worker.Recorder with whole parameters, also recording the buckets of BucketMOOFSDPStrategy."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx % self.accumulate == 0:
            self.snapshots.append(named_params(module.net))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if (batch_idx + 1) % self.accumulate == 0 and hasattr(trainer.strategy, "buckets"):
            self.buckets.append(copy.deepcopy(trainer.strategy.buckets))


def make_strategy(spec: dict):
    kind, fsdp = spec.get("strategy", "fsdp"), dict(spec.get("fsdp", {}))
    if kind == "fsdp_stock":
        # Pure FSDP over every rank ("auto" would make the ranks of one node tensor-parallel).
        return ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1, **fsdp)
    return BucketMOOFSDPStrategy(
        solver=worker.make_solver(spec["solver"]), exchange=spec.get("exchange", "sharded"), languages=spec.get("languages"), **fsdp
    )


class SaveBuckets(pl.Callback):
    """For the CLI test: rank zero writes the strategy's bucket records and the final weights (each
    gathered from its shards: a collective, so every rank takes part) at the end of fit."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_end(self, trainer, pl_module) -> None:
        from torch.distributed.tensor import DTensor

        weights = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in pl_module.named_parameters()}
        if trainer.is_global_zero:
            names = [n for n, p in pl_module.named_parameters() if p.requires_grad]
            torch.save({"buckets": trainer.strategy.buckets, "names": names, "weights": weights}, self.path)


# worker.run looks these names up when it runs: the rest of a run (data, trainer, resume, errors,
# results) stays exactly worker.py's.
worker.make_strategy, worker.Recorder, worker.ToyModule, worker.named_params = make_strategy, Recorder, FSDPToy, named_params

if __name__ == "__main__":
    worker.main()
