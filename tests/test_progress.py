"""The CLI's progress bar counts optimizer steps against max_steps, across epochs and after a resume."""

from __future__ import annotations

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from torch.utils.data import DataLoader

from lightning_moo.callbacks.progress import StepProgressBar


def fit(tmp_path, max_steps: int, ckpt_path=None) -> StepProgressBar:
    bar = StepProgressBar()
    # 3 batches per epoch: several epochs, so that Lightning's bar would restart its count each epoch.
    model = BoringModel()
    model.train_dataloader = lambda: DataLoader(RandomDataset(32, 3), batch_size=1)
    trainer = Trainer(max_steps=max_steps, callbacks=[bar, ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)],
                      logger=False, limit_val_batches=0, enable_model_summary=False, accelerator="cpu", devices=1,
                      default_root_dir=tmp_path)
    trainer.fit(model, ckpt_path=ckpt_path)
    return bar


def test_the_bar_shows_global_step_of_max_steps_also_after_a_resume(tmp_path):
    bar = fit(tmp_path, 4)
    task = bar.progress.tasks[bar.train_progress_bar_id]
    assert (task.completed, task.total) == (4, 4)
    resumed = fit(tmp_path, 7, ckpt_path=str(tmp_path / "epoch=1-step=4.ckpt"))
    task = resumed.progress.tasks[resumed.train_progress_bar_id]
    assert (task.completed, task.total) == (7, 7)
    assert task.description.strip() == "step (epoch 2)" and "/-" not in task.description
