"""Where a run logs, and logging to it: the run's log directory, scalars to every logger, and
matplotlib figures to TensorBoard."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger


def output_dir(trainer: Trainer) -> Path:
    """The run's log directory, or the trainer's root directory when there is no logger.

    Not ``trainer.log_dir``: it broadcasts from rank zero, a collective that rank zero must not
    enter alone (as it does while it alone analyses or prints the run summary), so a multi-process
    run would hang here."""
    return Path(getattr(trainer.logger, "log_dir", None) or trainer.default_root_dir)


def tensorboard_writer(trainer: Trainer):
    """The SummaryWriter of the trainer's TensorBoardLogger, or None when it has none."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def log_scalars(trainer: Trainer, metrics: Mapping[str, float]) -> None:
    """Scalars to every logger (not only TensorBoard), at the current global step."""
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=trainer.global_step)


def log_figure(trainer: Trainer, tag: str, figure) -> None:
    """A matplotlib Figure as a TensorBoard image, drawn with the Agg canvas directly so that no global
    pyplot backend is switched or left holding figures."""
    writer = tensorboard_writer(trainer)
    if writer is None:
        return
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    image = np.asarray(canvas.buffer_rgba())[..., :3]
    writer.add_image(tag, image, global_step=trainer.global_step, dataformats="HWC")
