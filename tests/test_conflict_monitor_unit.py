"""ConflictMonitor in one process: its refusals, when it logs, and what its heatmap shows.

The end-to-end check against autograd with DeepSpeed is in tests/distributed/test_conflict_monitor.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.nn.functional import cosine_similarity

from lightning_moo.callbacks import ConflictMonitor, conflict_monitor
from lightning_moo.buckets import BucketInfo, ParamRange
from lightning_moo.tensorboard import RunWriters


class Writer:
    """Records what the callback would send to one TensorBoard run."""

    def __init__(self) -> None:
        self.scalars, self.figures, self.histograms, self.layout = {}, {}, {}, None

    def add_custom_scalars(self, layout):
        self.layout = layout

    def add_scalar(self, tag, value, step):
        self.scalars[(tag, step)] = value

    def add_histogram(self, tag, values, step):
        self.histograms[(tag, step)] = values

    def add_image(self, tag, figure, step, dataformats):
        # The heatmap's values and row labels, read from the matplotlib figure itself (the autouse
        # fixture below hands over the figure instead of its pixels).
        assert dataformats == "HWC"
        if isinstance(figure, np.ndarray):  # pixels drawn by the monitor's drawing process
            self.figures[(tag, step)] = (figure, None)
            return
        ax = figure.axes[0]
        values = ax.images[0].get_array().data.copy() if ax.images else None
        self.figures[(tag, step)] = (values, [t.get_text() for t in ax.get_yticklabels()])

    def flush(self):
        pass

    def close(self):
        pass


@pytest.fixture(autouse=True)
def figures_not_pixels(monkeypatch):
    monkeypatch.setattr(conflict_monitor, "figure_pixels", lambda figure: figure)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(4, 3)
        self.body = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2, bias=False)


def toy_buckets(J: torch.Tensor, step: int) -> dict[int, BucketInfo]:
    """Reduction order is backward order: head first, embeddings last."""
    layout = [("head.weight", 6), ("body.weight", 9), ("body.bias", 3), ("embed.weight", 12)]
    buckets, offset = {}, 0
    for index, (name, numel) in enumerate(layout):
        block = J[:, offset : offset + numel]
        buckets[index] = BucketInfo(index, (ParamRange(name, 0, numel),), numel, block @ block.T, torch.full((3,), 1 / 3, dtype=torch.float64), step)
        offset += numel
    return buckets


class Runs(dict):
    """Run name → Writer, made on first use as RunWriters would make a SummaryWriter."""

    def __missing__(self, run):
        self[run] = Writer()
        return self[run]


def monitor_on(tmp_path, strategy, **kwargs) -> tuple[ConflictMonitor, SimpleNamespace, Runs]:
    """A monitor writing into fake runs; inline (background=False) unless asked, so that the figures
    themselves reach the fake writer."""
    monitor = ConflictMonitor(**{"background": False, **kwargs})
    trainer = SimpleNamespace(
        strategy=strategy, loggers=[TensorBoardLogger(tmp_path)], is_global_zero=True, global_step=0,
        log_every_n_steps=50, callback_metrics={}, sanity_checking=False,
    )
    monitor.setup(trainer, Net(), "fit")
    runs = Runs()
    monitor._runs = RunWriters(runs[""], tmp_path, make_writer=lambda path: runs[str(path.relative_to(tmp_path))])
    return monitor, trainer, runs


def test_refuses_a_strategy_without_buckets():
    trainer = SimpleNamespace(strategy=SimpleNamespace(), loggers=[])
    with pytest.raises(MisconfigurationException, match="BucketMOOStrategy"):
        ConflictMonitor().setup(trainer, Net(), "fit")


def test_refuses_a_trainer_without_tensorboard(tmp_path):
    trainer = SimpleNamespace(strategy=SimpleNamespace(buckets={}), loggers=[CSVLogger(tmp_path)])
    with pytest.raises(MisconfigurationException, match="TensorBoardLogger.*CSVLogger|CSVLogger.*TensorBoardLogger"):
        ConflictMonitor().setup(trainer, Net(), "fit")


def test_refuses_non_positive_intervals():
    with pytest.raises(ValueError, match="≥ 1"):
        ConflictMonitor(log_every_n_steps=0)


def test_logs_each_step_once_after_its_optimizer_step_and_draws_buckets_in_model_order(tmp_path):
    J = torch.randn(3, 30, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    strategy = SimpleNamespace(buckets=toy_buckets(J, step=2), languages=["en", "de", "fr"])
    monitor, trainer, runs = monitor_on(tmp_path, strategy, log_every_n_steps=2, image_every_n_steps=2)
    writer = runs[""]
    trainer.global_step = 2  # a micro-batch of step 2 before its optimizer step: nothing yet
    monitor.on_train_batch_end(trainer, None, None, None, 0)
    monitor.wait()
    assert not writer.scalars
    trainer.global_step = 3
    monitor.on_train_batch_end(trainer, None, None, None, 1)
    monitor.wait()
    logged = {run: dict(w.scalars) for run, w in runs.items()}
    monitor.on_train_batch_end(trainer, None, None, None, 2)
    monitor.wait()  # the same step again: not logged twice
    assert {run: w.scalars for run, w in runs.items()} == logged
    assert {step for tags in logged.values() for _, step in tags} == {2}
    pair = runs["pair/en-fr"].scalars[("by_pair/cosine", 2)]
    assert pair == pytest.approx(float(cosine_similarity(J[0], J[2], dim=0)))
    values, labels = writer.figures[("conflict/images/bucket_pair_cosines", 2)]
    # Rows follow named_parameters(): embed, body.weight, body.bias, head — the reverse of reduction.
    assert [label.split()[0] for label in labels] == ["#3", "#1", "#2", "#0"]
    blocks = {"#0": J[:, 0:6], "#1": J[:, 6:15], "#2": J[:, 15:18], "#3": J[:, 18:30]}
    for row, label in zip(values, labels):
        block = blocks[label.split()[0]]
        direct = [float(cosine_similarity(block[i], block[j], dim=0)) for i, j in ((0, 1), (0, 2), (1, 2))]
        assert row.tolist() == pytest.approx(direct, abs=1e-12)


def test_skips_steps_between_intervals_and_logs_nothing_off_rank_zero(tmp_path):
    J = torch.randn(3, 30, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    strategy = SimpleNamespace(buckets=toy_buckets(J, step=3), languages=3)
    monitor, trainer, runs = monitor_on(tmp_path, strategy, log_every_n_steps=2, image_every_n_steps=2)
    writer = runs[""]
    trainer.global_step = 4
    monitor.on_train_batch_end(trainer, None, None, None, 0)
    monitor.wait()
    assert not writer.scalars and not writer.figures  # step 3 is not a multiple of 2
    strategy.buckets = toy_buckets(J, step=4)
    trainer.global_step, trainer.is_global_zero = 5, False
    monitor.on_train_batch_end(trainer, None, None, None, 1)
    monitor.wait()
    assert not writer.scalars
    trainer.is_global_zero = True
    monitor.on_train_batch_end(trainer, None, None, None, 1)
    monitor.wait()
    assert ("by_language/grad_norm", 4) in runs["language/lang2"].scalars  # languages=3: generic names
