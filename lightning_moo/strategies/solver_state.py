"""Solver state in checkpoints, shared by the bucket-level MOO strategies."""

from __future__ import annotations

from typing import Any, Optional

SOLVER_STATE = "bucket_moo_solver"


class SolverStateInCheckpoints:
    """Mixin for a Lightning strategy with a ``solver``: stateful solvers (e.g. Nash-MTL's warm
    starts) resume where they were. The state is the same on every rank; rank zero's is stored."""

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Optional[Any] = None) -> None:
        checkpoint[SOLVER_STATE] = self.solver.state_dict()
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only)
        if SOLVER_STATE in checkpoint:
            self.solver.load_state_dict(checkpoint.pop(SOLVER_STATE))
        return checkpoint
