"""A progress bar that counts optimizer steps (``max_steps``), also across epochs and after a resume."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """Lightning's rich bar, but the training bar shows ``global_step / max_steps`` and "epoch N".

    Lightning's counts the batches of the current epoch against the epoch's length and titles it
    "Epoch N/max_epochs - 1": with ``max_steps`` and no ``max_epochs`` that reads "Epoch 0/-2", and a
    resumed run shows "60/9". ``lightning-moo`` uses this one unless the config names a progress bar.
    """

    @property
    def total_train_batches(self):
        max_steps = self.trainer.max_steps
        return max_steps if max_steps > 0 else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        description = f"step (epoch {current_epoch})" if self.trainer.max_steps > 0 else f"epoch {current_epoch}"
        return f"{description:{len(self.validation_description)}}"

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._update(self.train_progress_bar_id, trainer.global_step)
