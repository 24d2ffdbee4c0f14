"""EMA: any solver's weights smoothed over steps, per bucket (CR-MOGM, Zhou et al., NeurIPS 2022)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from .base import MOOSolver


class EMA(MOOSolver):
    """An exponential moving average of another solver's weights over steps, per bucket: the
    composite-weight smoothing of CR-MOGM (Zhou, Zhang, Jiang, Zhong, Gu, Zhu, "On the Convergence
    of Stochastic Multi-Objective Gradient Manipulation and Beyond", NeurIPS 2022), which makes
    stochastic gradient manipulation (MGDA, PCGrad, CAGrad, …) converge where weights taken from
    each mini-batch's gradients alone need not::

        w_s = β w_{s−1} + (1 − β) solver(G_s)

    with ``w`` of a bucket's first step (and of a step whose number of tasks differs from the
    last one's) the inner solver's weights. A step whose gradients are all zero returns the inner
    solver's neutral weights (the direction is zero anyway) and leaves the average unchanged.

    **State.** Per bucket, the last smoothed weights (``bucket_state()["weights"]``); the inner
    solver keeps its own state too. :meth:`state_dict` holds both (``{"buckets": ..., "solver":
    solver.state_dict()}``) and :meth:`load_state_dict` restores both.

    In YAML::

        solver:
          class_path: lightning_moo.solvers.EMA
          init_args:
            solver: {class_path: lightning_moo.solvers.MGDA}
            beta: 0.9

    Declarations (of an instance; the class attributes are those of the default ``EMA()``,
    smoothing MGDA): stateful. Scale-invariant exactly when the inner solver is, and
    permutation-equivariant exactly when the inner solver is: one step, given the same stored
    average (permuted with the tasks), adds ``(1 − β)`` times the inner solver's weights, whose
    direction has the property; on a bucket's first step the weights are the inner solver's. Over a
    sequence of steps, with the average carried, they hold where the inner solver's weights are
    unique, e.g. linearly independent gradients (the rule for a bucket's T ≪ its size): the average
    is of weight vectors, and where gradients are linearly dependent (duplicated, zero) a solver
    may return any of several weight vectors for the same direction, which the next step's
    gradients tell apart. Not conflict-free: an average of weights that suit earlier Grams can
    conflict with the current one (with ``beta = 0`` the weights are the inner solver's, and so are
    the declarations).

    Args:
        solver: the solver whose weights are smoothed: an instance, a registered name or a class
            path (default ``"mgda"``).
        beta: weight of the past, in [0, 1). CR-MOGM's analysis (its Corollary 1) lets this
            coefficient grow towards 1 as the learning rate decays rather than fixing a value;
            ``0.9`` is the fixed default of TorchJD's ``CRMOGMWeighting``, the usual EMA
            convention. ``0`` disables the smoothing.
    """

    name = "ema"
    conflict_free = False
    scale_invariant = True
    permutation_equivariant = True
    stateful = True

    def __init__(self, solver: MOOSolver | str = "mgda", beta: float = 0.9) -> None:
        super().__init__()
        from .registry import resolve_solver  # the registry imports this module

        if not 0.0 <= beta < 1.0:
            raise ValueError(f"EMA beta must be in [0, 1) (the weight of the past), got {beta!r}")
        inner = resolve_solver(solver)
        if not getattr(inner, "uses_gram", True):
            raise ValueError(
                f"EMA smooths the weights a Gram solver gives each bucket; {type(inner).__name__} weighs losses, "
                "not gradients"
            )
        self.solver = inner
        self.beta = beta
        self.scale_invariant = inner.scale_invariant
        self.permutation_equivariant = inner.permutation_equivariant
        self.conflict_free = beta == 0 and inner.conflict_free
        if getattr(inner, "needs_losses", False):
            self.needs_losses = True  # the strategies gather the losses the inner solver reads

    def neutral_weights(self, num_tasks: int) -> Tensor:
        return self.solver.neutral_weights(num_tasks)

    def weights(self, gram: Tensor) -> Tensor:
        context: dict[str, Any] = {"bucket": self.bucket, "step": self.step}
        if getattr(self, "losses", None) is not None:
            context["losses"] = self.losses
        fresh = self.solver(gram, **context).numpy()
        state = self.bucket_state()
        last = state.get("weights")
        if last is None or len(last) != fresh.shape[0]:
            smoothed = fresh
        else:
            smoothed = self.beta * np.asarray(last, dtype=np.float64) + (1.0 - self.beta) * fresh
        state["weights"] = smoothed.tolist()  # a new object: earlier state_dict() snapshots stay as they were
        return torch.from_numpy(np.array(smoothed, dtype=np.float64))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "solver": self.solver.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "solver" in state:
            self.solver.load_state_dict(state["solver"])
