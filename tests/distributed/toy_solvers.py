"""Solvers that exist only for the proofs."""

import torch

from lightning_moo.solvers import MOOSolver


class OneHot(MOOSolver):
    """All weight on one language: bucket-level MOO must then train that language alone."""

    def __init__(self, language: int) -> None:
        super().__init__()
        self.language = language

    def neutral_weights(self, num_tasks: int) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.tensor(self.language), num_tasks).double()

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        return self.neutral_weights(gram.shape[0])
