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
    writer.add_image(tag, figure_pixels(figure), global_step=trainer.global_step, dataformats="HWC")


def figure_pixels(figure) -> np.ndarray:
    """A matplotlib Figure drawn to an H×W×3 uint8 array by the Agg canvas (no pyplot, any thread)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


class RunWriters:
    """One SummaryWriter per TensorBoard run below a logger's run directory, created on first use.

    TensorBoard colours and names series by run, so values that exist once per language go to a run
    of their own (``runs["language/deu"]`` writes to ``<log_dir>/language/deu``) under a tag shared by
    every language, and one chart overlays them. ``runs[""]`` is the logger's own writer."""

    def __init__(self, main, root: Path, make_writer=None) -> None:
        if make_writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # A deeper queue than the default 10 events: a logged step writes dozens of scalars per run.
            make_writer = lambda path: SummaryWriter(log_dir=str(path), max_queue=1000)  # noqa: E731
        self.root = Path(root)
        self._make_writer = make_writer
        self._writers = {"": main}

    def __getitem__(self, run: str):
        if run not in self._writers:
            self._writers[run] = self._make_writer(self.root / run)
        return self._writers[run]

    def flush(self) -> None:
        for writer in self._writers.values():
            writer.flush()

    def close(self) -> None:
        """Close the sub-run writers (the logger closes its own)."""
        for run, writer in self._writers.items():
            if run:
                writer.close()
        self._writers = {"": self._writers[""]}
