"""Faults the reliability tests inject from inside a run, at a chosen step and rank (by class_path)."""

from __future__ import annotations

import os
import signal
import time

import lightning.pytorch as pl


class SignalAt(pl.Callback):
    """When batch ``step`` starts, the chosen ranks send themselves ``signal`` ``times`` times."""

    def __init__(self, step: int, ranks: list[int], signal: str = "SIGTERM", times: int = 1) -> None:
        self.step, self.ranks, self.signum, self.times = step, ranks, getattr(__import__("signal"), signal), times

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank in self.ranks:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)


class RaiseAt(pl.Callback):
    """Rank ``rank`` raises ValueError(message) when batch ``step`` starts."""

    def __init__(self, step: int, rank: int, message: str) -> None:
        self.step, self.rank, self.message = step, rank, message

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            raise ValueError(self.message)


class Slow(pl.Callback):
    """Every step takes at least ``seconds``: time for a signal from outside to arrive mid-run."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        time.sleep(self.seconds)


class KillDuringSave(pl.Callback):
    """Rank zero SIGKILLs itself right after it wrote the first file of the save of a checkpoint whose
    path contains ``name``, at step ``step``: the other files of that checkpoint are never written."""

    def __init__(self, step: int, name: str = "last.ckpt") -> None:
        self.step, self.name = step, name

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.global_step != self.step or trainer.global_rank != 0:
            return
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        original, name = TorchCheckpointEngine.save, self.name

        def save_then_die(engine, state_dict, path):
            original(engine, state_dict, path)
            if name in str(path):
                os.kill(os.getpid(), signal.SIGKILL)

        TorchCheckpointEngine.save = save_then_die


class PoisonAt(pl.Callback):
    """Rank ``rank`` sets its copy of one weight to NaN when batch ``step`` starts: its language diverges."""

    def __init__(self, step: int, rank: int) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            import torch

            with torch.no_grad():
                next(p for p in pl_module.parameters() if p.requires_grad).fill_(float("nan"))
