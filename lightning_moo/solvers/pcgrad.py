"""PCGrad (Yu et al., NeurIPS 2020): project away conflicting components, in Gram space."""

from __future__ import annotations

import zlib
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from .base import MOOSolver


class PCGrad(MOOSolver):
    """Gradient surgery. For each task i, in a random order of all tasks j: if the running
    projected gradient conflicts with the original ``g_j`` it is projected onto ``g_j``'s normal
    plane. The update is the sum (paper) or mean of the projected gradients.

    Every projected gradient is tracked as coefficients over the originals, so only the Gram
    matrix is needed. The random orders come from ``(seed, step, bucket)`` alone, so every rank
    draws the same orders for the same step and bucket, and a resumed run draws the same ones.

    Declarations: scale-invariant (projection coefficients do not change with the scale);
    stateless (the orders are a function of seed, step and bucket, so a resumed run redraws the
    same ones). Not conflict-free and not permutation-equivariant beyond two tasks: with T ≥ 3
    the projected gradients depend on the random order, and the sum of projections can still
    conflict with a task (for T = 2 both hold; the property tests check that case separately).

    Args:
        seed: base seed of the orders.
        reduction: ``"sum"`` (paper) or ``"mean"``.
    """

    name = "pcgrad"
    conflict_free = False
    scale_invariant = True
    permutation_equivariant = False
    stateful = False

    def __init__(self, seed: int = 0, reduction: Literal["sum", "mean"] = "sum") -> None:
        super().__init__()
        if reduction not in ("sum", "mean"):
            raise ValueError(f"PCGrad reduction must be 'sum' or 'mean', got {reduction!r}")
        self.seed = seed
        self.reduction = reduction

    def neutral_weights(self, num_tasks: int) -> Tensor:
        return torch.full((num_tasks,), 1.0 if self.reduction == "sum" else 1.0 / num_tasks, dtype=torch.float64)

    def orders(self, num_tasks: int) -> list[list[int]]:
        """The order of tasks each task i is projected against, for the current step and bucket."""
        # A stable key (Python's hash() of a str differs between processes, i.e. between ranks).
        bucket_key = self.bucket if isinstance(self.bucket, int) else zlib.crc32(str(self.bucket).encode())
        rng = np.random.default_rng([self.seed, self.step, bucket_key])
        return [rng.permutation(num_tasks).tolist() for _ in range(num_tasks)]

    def weights(self, gram: Tensor) -> Tensor:
        G = gram.numpy()
        T = G.shape[0]
        coeffs = np.eye(T)  # row i: the projected gradient of task i over the originals
        for i, order in enumerate(self.orders(T)):
            for j in order:
                dot = float(coeffs[i] @ G[:, j])
                if dot < 0 and G[j, j] > 0:  # a zero gradient conflicts with nothing
                    coeffs[i, j] -= dot / G[j, j]
        w = coeffs.sum(axis=0)
        return torch.from_numpy(w if self.reduction == "sum" else w / T)
