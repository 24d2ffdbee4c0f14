"""Gram-based multi-objective solvers: ``weights(gram: T×T) -> T weights``."""

from .base import MOOSolver, check_gram
from .linear import Mean, Sum

__all__ = ["MOOSolver", "check_gram", "Mean", "Sum"]
