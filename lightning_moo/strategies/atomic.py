"""Checkpoints that are either the old one or the new one, never a mix: written aside, then renamed."""

from __future__ import annotations

import os
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

# Collectives wait this long for a silent rank before failing (PyTorch's default: 30 minutes, during
# which a hung rank holds every GPU). A strategy's `timeout` (e.g. "0:02:00") overrides it.
DEFAULT_TIMEOUT = timedelta(minutes=10)
PARTIAL = ".partial"
OLD = ".old"


class AtomicCheckpoints:
    """Strategy mixin: ``save_checkpoint`` writes ``<path>.partial`` (every rank its part), and once all
    ranks are done rank zero renames it to ``<path>``. A kill during the save leaves the previous
    ``<path>`` whole (an overwritten ``last.ckpt`` could otherwise hold one step's weights and another's
    optimizer shards). A DeepSpeed checkpoint is a directory, which no rename replaces in one step: the
    old one is first renamed to ``<path>.old`` and removed after; a kill in between leaves it there."""

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Optional[Any] = None) -> None:
        final = Path(filepath)
        partial = final.with_name(final.name + PARTIAL)
        if self.is_global_zero:
            remove(partial)  # left behind by a save that was killed
        self.barrier("checkpoint_partial_cleared")
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier("checkpoint_written")
        if self.is_global_zero:
            replace(partial, final)
        self.barrier("checkpoint_renamed")


def replace(new: Path, final: Path) -> None:
    if not new.is_dir():
        os.replace(new, final)  # atomic for files
        return
    old = final.with_name(final.name + OLD)
    remove(old)
    if final.exists() or final.is_symlink():
        os.replace(final, old)
    os.replace(new, final)
    remove(old)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
