"""Preemption: SIGTERM ends training after the current step, with a checkpoint of that step."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Optional, Sequence

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint

# What a shell reports for a process ended by SIGTERM (128 + 15): schedulers read it as "killed",
# not "succeeded", and requeue the job where they are set to.
PREEMPTED_EXIT = 143


class Preemption(pl.Callback):
    """A SIGTERM (what a scheduler sends before it preempts a job) to the launching process, to every
    rank, or to any of them, in any order and any number of times: every rank finishes its current
    step, a checkpoint of that step is saved as ``last.ckpt`` in the ``ModelCheckpoint`` folder (else
    ``<default_root_dir>/checkpoints``), ``fit`` stops, and ``lightning-moo`` exits with status 143.

    Lightning's own SIGTERM handler runs a collective inside the signal handler, so ranks that receive
    different numbers of signals deadlock; it also ends ``fit`` without a checkpoint and with status 0.
    From the first hook after Lightning installs it, this callback's handler replaces it and only sets
    a flag; the ranks agree on the flag with one all-reduce of one number per step, at the step's end,
    where every rank is. ``lightning-moo`` adds this callback unless the config has one.

    Args:
        signals: the signals that mean "preempted" (e.g. add ``SIGUSR1`` for SLURM's ``--signal``).
    """

    def __init__(self, signals: Sequence[str] = ("SIGTERM",)) -> None:
        self.signals = [getattr(signal, name) for name in signals]
        self.received: Optional[int] = None
        self.checkpoint: Optional[Path] = None  # where the preemption checkpoint went, once saved
        self.step: Optional[int] = None
        self.rank = 0

    @property
    def preempted(self) -> bool:
        return self.checkpoint is not None

    def _install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                signal.signal(signum, self._on_signal)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.rank = trainer.global_rank

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install()

    def _on_signal(self, signum: int, frame) -> None:
        first = self.received is None
        self.received = signum
        if first and self.rank == 0:
            # os.write: a signal handler must not take the locks print() may hold.
            os.write(2, f"lightning-moo: {signal.Signals(signum).name} received: saving a checkpoint after this step\n".encode())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        if not self._agreed(trainer):
            return
        path = checkpoint_dir(trainer) / "last.ckpt"
        trainer.save_checkpoint(path)  # every rank: DeepSpeed writes a shard per rank
        self.checkpoint, self.step = path, trainer.global_step
        if isinstance(trainer.checkpoint_callback, ModelCheckpoint):
            trainer.checkpoint_callback.last_model_path = str(path)
        trainer.should_stop = True

    def _agreed(self, trainer: pl.Trainer) -> bool:
        """Whether any rank received a signal: the same answer on every rank, at the same step."""
        if self.checkpoint is not None:
            return False
        flag = torch.tensor([0.0 if self.received is None else 1.0], device=trainer.strategy.root_device)
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def checkpoint_dir(trainer: pl.Trainer) -> Path:
    """The ModelCheckpoint's folder (where ``--ckpt_path last`` looks), else the root's ``checkpoints``."""
    callback = trainer.checkpoint_callback
    if isinstance(callback, ModelCheckpoint) and callback.dirpath:
        return Path(callback.dirpath)
    return Path(trainer.default_root_dir) / "checkpoints"
