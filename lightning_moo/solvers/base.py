"""The solver interface: a Gram matrix in, one weight per task out.

Every solver here maps the T×T Gram matrix ``G[i, j] = <g_i, g_j>`` of the T
per-language gradients of one bucket to weights ``w`` such that the bucket's
update is ``d = sum_t w_t g_t``. No solver ever touches a parameter-sized tensor,
so the same class serves a 100-element bucket and a whole model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor


class MOOSolver(ABC):
    """Base class of all multi-objective solvers.

    Subclasses implement :meth:`weights`. Call the solver (``solver(gram, bucket=..., step=...)``)
    rather than :meth:`weights` directly: the call validates the Gram matrix, hands ``weights`` a
    symmetric float64 CPU copy, checks the result and returns it on the Gram's device and dtype.

    Stateful solvers keep what they need between steps in :meth:`bucket_state`, a dict per bucket
    id; :meth:`state_dict` / :meth:`load_state_dict` carry it through checkpoints.

    **Declarations.** Class attributes say what a solver guarantees; the defaults here claim
    nothing (and ``stateful = True``, the safe assumption). The class attribute is what the default
    configuration ``cls()`` guarantees; a constructor whose arguments change that sets the instance
    attribute (e.g. ``CAGrad(c=1.0).conflict_free`` is True, ``CAGrad.conflict_free`` is False), so
    ask an instance when you have one. ``tests/test_solver_properties.py`` checks every declared
    guarantee of every built-in solver on random and degenerate Gram matrices.

    - ``conflict_free``: the direction conflicts with no task: ``<g_t, d> ≥ 0`` for every t, i.e.
      ``G @ w ≥ 0`` (to rounding).
    - ``scale_invariant``: ``weights(c·G) = weights(G)`` for every ``c > 0`` (the same direction
      ``Jᵀw``, to rounding): scaling every gradient by ``a > 0`` scales ``d`` by ``a``.
    - ``permutation_equivariant``: permuting the tasks permutes the weights:
      ``weights(P G Pᵀ) = P weights(G)`` (the same direction).
    - ``stateful``: the weights may depend on earlier steps, through state kept in
      :meth:`bucket_state` (carried by :meth:`state_dict`); when False the weights are a function of
      the Gram matrix and ``(bucket, step)`` alone and ``state_dict()`` stays empty.

    **Per-step context.** ``solver(gram, bucket=..., step=..., losses=...)`` sets ``self.bucket``,
    ``self.step`` and ``self.losses`` (each language's loss this step, float64 [T], or None) before
    ``weights`` runs. A solver that reads ``self.losses`` sets ``needs_losses = True``, and the
    strategies then gather the languages' losses every step. A loss-based weighting (``uses_gram =
    False``, see :class:`~lightning_moo.solvers.loss_based.LossWeighting`) needs no gradients at all:
    the strategies scale each language's loss before the backward and reduce gradients the stock way.

    ``name`` is the short, case-insensitive name the registry
    (:mod:`lightning_moo.solvers.registry`) lists a registered class under (default: the class
    name in lower case).
    """

    name: ClassVar[str | None] = None
    conflict_free: bool = False
    scale_invariant: bool = False
    permutation_equivariant: bool = False
    stateful: bool = True
    needs_losses: ClassVar[bool] = False
    uses_gram: ClassVar[bool] = True

    def __init__(self) -> None:
        self._states: dict[Hashable, dict[str, Any]] = {}
        self.bucket: Hashable = 0
        self.step: int = 0
        self.losses: Tensor | None = None

    @abstractmethod
    def weights(self, gram: Tensor) -> Tensor:
        """Return the T task weights for a symmetric, finite, float64 T×T Gram matrix (CPU)."""

    def supports_on_device(self, num_tasks: int) -> bool:
        """Whether :meth:`weights_on_device` serves ``num_tasks`` tasks as configured (default: no)."""
        return False

    def weights_on_device(self, gram: Tensor) -> Tensor:
        """The weights, computed where ``gram`` lives without waiting for it: no value read on the
        host (``.item()``, ``bool()``, a copy to the CPU), so on CUDA nothing stalls the backward.
        Float64 [T] on ``gram``'s device, NaN for a non-finite Gram (the caller checks after the
        backward). Called only where :meth:`supports_on_device` says so; no validation is done."""
        raise NotImplementedError(f"{type(self).__name__} solves on the host only")

    def neutral_weights(self, num_tasks: int) -> Tensor:
        """Weights returned when every gradient is zero (the direction is zero whatever they are)."""
        return torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64)

    def __call__(self, gram: Tensor, *, bucket: Hashable = 0, step: int = 0, losses: Tensor | None = None) -> Tensor:
        checked = _checked_gram(gram)
        T = checked.shape[0]
        self.bucket, self.step = bucket, step
        self.losses = None if losses is None else check_losses(losses, T)
        if not checked.diagonal().any():
            w = self.neutral_weights(T)
        else:
            w = self.weights(torch.from_numpy(checked))
        w = torch.as_tensor(w, dtype=torch.float64, device="cpu")
        if w.shape != (T,):
            raise RuntimeError(f"{type(self).__name__}.weights returned shape {tuple(w.shape)}, expected ({T},)")
        if not np.isfinite(w.detach().numpy()).all():
            raise RuntimeError(f"{type(self).__name__} produced non-finite weights {w.tolist()} for Gram {checked.tolist()}")
        out_dtype = gram.dtype if isinstance(gram, Tensor) and gram.dtype.is_floating_point else torch.float64
        device = gram.device if isinstance(gram, Tensor) else "cpu"
        return w.to(device=device, dtype=out_dtype)

    def bucket_state(self) -> dict[str, Any]:
        """Mutable state of the bucket being solved (empty dict on first use)."""
        return self._states.setdefault(self.bucket, {})

    def state_dict(self) -> dict[str, Any]:
        return {"buckets": {k: dict(v) for k, v in self._states.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._states = {k: dict(v) for k, v in state["buckets"].items()}

    def declarations(self) -> dict[str, bool]:
        """What this solver, as configured, declares: ``{"conflict_free": ..., ...}``."""
        return {key: bool(getattr(self, key)) for key in DECLARATIONS}

    def __repr__(self) -> str:
        hidden = ("bucket", "step", "losses", *DECLARATIONS)
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and k not in hidden)
        return f"{type(self).__name__}({args})"


#: The declarations every solver class carries (class attributes of :class:`MOOSolver`).
DECLARATIONS = ("conflict_free", "scale_invariant", "permutation_equivariant", "stateful")


def check_losses(losses: Tensor, num_tasks: int) -> Tensor:
    """Validate one step's per-task losses and return a float64 CPU copy."""
    losses = torch.as_tensor(losses).detach().to(device="cpu", dtype=torch.float64)
    if losses.shape != (num_tasks,):
        raise ValueError(f"expected {num_tasks} per-task losses, got shape {tuple(losses.shape)}")
    if not bool(torch.isfinite(losses).all()):
        bad = [t for t in range(num_tasks) if not bool(torch.isfinite(losses[t]))]
        raise ValueError(
            f"the loss of task(s) {bad} is NaN/Inf ({losses.tolist()}): check those languages' inputs, lower the "
            "learning rate, or enable loss scaling / gradient clipping"
        )
    return losses


def check_gram(gram: Tensor) -> Tensor:
    """Validate a Gram matrix and return a symmetric float64 CPU copy.

    Raises ``ValueError`` naming the problem for a non-square or empty matrix, non-finite
    entries (a NaN or overflowing gradient) and a negative diagonal (not a Gram matrix).
    """
    return torch.from_numpy(_checked_gram(gram))


def _checked_gram(gram: Tensor) -> np.ndarray:
    """:func:`check_gram` as a NumPy array. At T ≤ a few dozen every torch op costs more than the
    arithmetic, so the checks and the symmetrisation run in NumPy on the float64 CPU data, which
    is only converted when it is something else."""
    if not isinstance(gram, Tensor):
        gram = torch.as_tensor(gram)
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] == 0:
        raise ValueError(f"expected a non-empty square T×T Gram matrix, got shape {tuple(gram.shape)}")
    g = gram.detach()
    if g.device.type != "cpu" or g.dtype != torch.float64:
        g = g.to(device="cpu", dtype=torch.float64)
    g = g.numpy()
    if not np.isfinite(g).all():
        bad = sorted({int(i) for i in np.nonzero(~np.isfinite(g))[0]})
        raise ValueError(
            f"Gram matrix has non-finite entries (NaN or Inf) in rows {bad}: the gradient of task(s) {bad} "
            "is NaN/Inf or overflowed. Check those tasks' losses, lower the learning rate, or enable loss "
            "scaling / gradient clipping; solvers never return NaN weights."
        )
    diag = g.diagonal()
    if (diag < 0).any():
        raise ValueError(f"Gram matrix has a negative diagonal {diag.tolist()}: squared norms cannot be negative")
    return 0.5 * (g + g.T)
