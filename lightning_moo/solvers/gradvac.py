"""GradVac (Wang, Tsvetkov, Firat & Cao, ICLR 2021): gradient vaccine, in Gram space."""

from __future__ import annotations

import math
import zlib

import numpy as np
import torch
from torch import Tensor

from .base import MOOSolver

# What a Gram matrix can resolve. A running gradient whose squared norm is below _CANCELLED of
# (Σ_k |c_k| ‖g_k‖)² has cancelled to rounding (its norm is below 3e-7 of the gradients it is made
# of, and its direction is noise): it counts as zero. A cosine within _PARALLEL of ±1 (an angle
# below 1.4e-7) counts as parallel: √(1−φ²) computed from a rounded φ is noise of order 1e-8 there,
# and would otherwise leave a residue of that size where an exactly opposed gradient cancels.
_CANCELLED = 1e-13
_PARALLEL = 1e-14


class GradVac(MOOSolver):
    """Gradient Vaccine (Wang, Tsvetkov, Firat, Cao, "Gradient Vaccine: Investigating and
    Improving Multi-task Optimization in Massively Multilingual Models", ICLR 2021).

    Each ordered pair of tasks has a target cosine ``φ̂_ij``, an exponential moving average of the
    cosines observed at earlier steps (per bucket; ``φ̂ = 0`` before the first step, so the first
    step is PCGrad). For each task i, for each other task j in a random order, with ``g_i'`` the
    running (vaccinated) gradient of task i, initially ``g_i``:

    - ``φ = cos(g_i', g_j)``;
    - if ``φ < φ̂_ij``, ``g_j`` is added to ``g_i'`` so that their cosine becomes exactly ``φ̂_ij``
      (the paper's vaccine update)::

          g_i' += ‖g_i'‖ (φ̂_ij √(1−φ²) − φ √(1−φ̂_ij²)) / (‖g_j‖ √(1−φ̂_ij²)) · g_j

    - ``φ̂_ij ← (1−β) φ̂_ij + β φ``.

    The update is the sum of the vaccinated gradients (paper; LibMTL). Every vaccinated gradient
    is tracked as coefficients over the original gradients, so only the Gram matrix is needed.

    **Which cosine updates the target, and when.** The paper's target is a moving average of the
    similarity observed at every step; its update rule (Algorithm 1) and TorchJD's ``GradVac``
    update ``φ̂_ij`` after every comparison, with the cosine ``φ`` just computed, i.e. that of the
    running ``g_i'`` *before* this pair's vaccination, whether or not it vaccinated; that is what
    this class does. (LibMTL's ``GradVac`` updates the target only when it
    vaccinates, so its targets can only fall from 0; not followed here.) A pair whose cosine is
    undefined (``g_i'`` or ``g_j`` is zero) neither vaccinates nor moves its target: a zero gradient
    conflicts with nothing; so does a running gradient that has cancelled to rounding, and a cosine
    within 1e-14 of ±1 counts as exactly parallel (a Gram matrix resolves no finer: see
    ``_CANCELLED`` and ``_PARALLEL``), so that rounding cannot turn an exact cancellation into a
    target update. A target of exactly ±1 (reachable only by rounding or ``beta = 1``)
    cannot be met by any finite multiple of ``g_j``, so that pair is left as it is.

    **Orders.** The order of the other tasks j for each task i is drawn from
    ``(seed, step, bucket)`` alone (the same draw as :class:`~lightning_moo.solvers.PCGrad`'s, with
    i itself left out), so every rank draws the same orders and a resumed run draws the same ones.
    On the first step of a bucket (all targets 0) the result is PCGrad's with the same seed (to
    rounding).

    **State.** Per bucket, the T×T matrix of targets ``φ̂`` (``bucket_state()["phi_hat"]``, a list
    of lists, saved by :meth:`state_dict`). A bucket whose number of tasks changes starts again
    from zero targets.

    Declarations: scale-invariant (cosines and the norm ratio ``‖g_i'‖/‖g_j‖`` do not change when
    every gradient is scaled by ``a > 0``, so neither do the coefficients nor the targets'
    updates); stateful (the targets). Not conflict-free: the first step is PCGrad, which with
    T ≥ 3 can conflict, and with T = 2 a learned negative target ``φ̂ < 0`` only lifts the cosine
    to ``φ̂``, leaving a conflict. Not permutation-equivariant: the orders are random (for T = 2 on
    a bucket's first step it is PCGrad on two tasks, which is).

    Args:
        beta: EMA rate of the targets, in [0, 1]: ``φ̂ ← (1−β) φ̂ + β φ``. The paper's
            ``β = 1e-2`` (LibMTL and TorchJD default to 0.5). ``beta = 0`` keeps every target at 0:
            PCGrad at every step.
        seed: base seed of the orders.
    """

    name = "gradvac"
    conflict_free = False
    scale_invariant = True
    permutation_equivariant = False
    stateful = True

    def __init__(self, beta: float = 0.01, seed: int = 0) -> None:
        super().__init__()
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"GradVac beta must be in [0, 1], got {beta!r}")
        self.beta = beta
        self.seed = seed

    def neutral_weights(self, num_tasks: int) -> Tensor:
        return torch.ones(num_tasks, dtype=torch.float64)  # the sum of the (zero) gradients

    def orders(self, num_tasks: int) -> list[list[int]]:
        """For each task i, the order of the other tasks j it is vaccinated against, for the
        current step and bucket (PCGrad's draw for the same seed, step and bucket, without i)."""
        # A stable key (Python's hash() of a str differs between processes, i.e. between ranks).
        bucket_key = self.bucket if isinstance(self.bucket, int) else zlib.crc32(str(self.bucket).encode())
        rng = np.random.default_rng([self.seed, self.step, bucket_key])
        return [[j for j in rng.permutation(num_tasks).tolist() if j != i] for i in range(num_tasks)]

    def weights(self, gram: Tensor) -> Tensor:
        G = gram.numpy()
        T = G.shape[0]
        state = self.bucket_state()
        stored = state.get("phi_hat")
        phi_hat = np.array(stored, dtype=np.float64) if stored is not None else np.zeros((T, T))
        if phi_hat.shape != (T, T):
            phi_hat = np.zeros((T, T))
        norms = np.sqrt(np.diag(G))
        coeffs = np.eye(T)  # row i: the vaccinated gradient of task i over the originals
        for i, order in enumerate(self.orders(T)):
            for j in order:
                norm2_j = float(G[j, j])
                norm2_i = float(coeffs[i] @ G @ coeffs[i])
                if norm2_j <= 0 or norm2_i <= _CANCELLED * float(np.abs(coeffs[i]) @ norms) ** 2:
                    continue  # a zero gradient (or one cancelled to rounding): no cosine, no conflict
                norm_i, norm_j = math.sqrt(norm2_i), math.sqrt(norm2_j)
                dot = float(coeffs[i] @ G[:, j])
                phi = min(max(dot / (norm_i * norm_j), -1.0), 1.0)
                target = float(phi_hat[i, j])
                if phi < target:
                    sin_target = math.sqrt(max(1.0 - target * target, 0.0))
                    if sin_target > 0:
                        # The vaccine update, split as φ̂‖g_i'‖√(1−φ²)/(‖g_j‖√(1−φ̂²)) − ⟨g_i', g_j⟩/‖g_j‖²: the second
                        # term is PCGrad's projection, exactly, when the target is 0.
                        sin_phi = math.sqrt(1.0 - phi * phi) if 1.0 - abs(phi) > _PARALLEL else 0.0
                        coeffs[i, j] += target * norm_i * sin_phi / (norm_j * sin_target) - dot / norm2_j
                phi_hat[i, j] = (1.0 - self.beta) * target + self.beta * phi
        state["phi_hat"] = phi_hat.tolist()  # a new object: earlier state_dict() snapshots stay as they were
        return torch.from_numpy(coeffs.sum(axis=0))
