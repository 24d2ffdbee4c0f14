"""Linear scalarization: the weights do not depend on the gradients."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import MOOSolver


class Mean(MOOSolver):
    """Average of the task gradients: exactly what stock data parallelism applies.

    Declarations: scale-invariant, permutation-equivariant, stateless; not conflict-free (a long
    gradient can outweigh a short opposing one)."""

    name = "mean"
    scale_invariant = True
    permutation_equivariant = True
    stateful = False

    def weights(self, gram: Tensor) -> Tensor:
        return self.neutral_weights(gram.shape[0])

    def supports_on_device(self, num_tasks: int) -> bool:
        return True

    def weights_on_device(self, gram: Tensor) -> Tensor:
        # Made on the device: a copy from host memory would wait for it.
        return torch.full((gram.shape[0],), 1.0 / gram.shape[0], dtype=torch.float64, device=gram.device)


class Sum(MOOSolver):
    """Sum of the task gradients. Declarations: as :class:`Mean`."""

    name = "sum"
    scale_invariant = True
    permutation_equivariant = True
    stateful = False

    def neutral_weights(self, num_tasks: int) -> Tensor:
        return torch.ones(num_tasks, dtype=torch.float64)

    def weights(self, gram: Tensor) -> Tensor:
        return self.neutral_weights(gram.shape[0])

    def supports_on_device(self, num_tasks: int) -> bool:
        return True

    def weights_on_device(self, gram: Tensor) -> Tensor:
        return torch.ones(gram.shape[0], dtype=torch.float64, device=gram.device)
