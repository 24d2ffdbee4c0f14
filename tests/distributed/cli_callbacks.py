"""Callbacks the CLI tests name by class_path: save the final weights, die abruptly at a step."""

from __future__ import annotations

import os
import signal

import lightning.pytorch as pl
import torch


class SaveParams(pl.Callback):
    """Rank zero writes the Hugging Face model's parameters at the end of fit."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if getattr(trainer.strategy, "zero_stage_3", False):
            import deepspeed

            # ZeRO-3 keeps a partition of each parameter per rank: gathering them is a collective.
            with deepspeed.zero.GatheredParameters(list(pl_module.model.parameters())):
                self._save(trainer, pl_module)
        else:
            self._save(trainer, pl_module)

    def _save(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            torch.save({n: p.detach().clone() for n, p in pl_module.model.named_parameters()}, self.path)


class KillAt(pl.Callback):
    """Every rank SIGKILLs itself when batch ``step`` starts: no teardown, no flushing, like a lost node."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
