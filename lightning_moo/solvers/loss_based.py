"""Loss-based weightings: one weight per language from the languages' losses, no gradients.

Where a Gram solver combines gradients inside each bucket, these weigh the losses before the
backward: each rank scales its own language's loss, so DeepSpeed or DDP reduce the gradients the
stock way (no bucket hook, stock communication). The update is ``Σ_t w_t ∇L_t`` with the weights
as each paper applies them to the losses (DWA's sum to T, RLW's to 1, ...).

A weighting implements :meth:`LossWeighting.loss_weights`; call :meth:`LossWeighting.weigh` once
per optimizer step with that step's T losses (every rank calls it with the same losses, so every
rank holds the same state). State (learned log-variances, FAMO's logits and their optimizer,
the previous losses) lives in ``bucket_state()`` and is saved in checkpoints like a solver's.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .base import MOOSolver, check_losses

_STATE = "losses"  # the one "bucket" a loss weighting keeps its state under


class LossWeighting(MOOSolver):
    """Base class of the loss-based weightings (``uses_gram = False``).

    Declarations: no direction guarantees (the weights ignore the gradients); not scale-invariant
    in general; permutation-equivariant where the formula is; ``stateful`` as each method is.
    """

    uses_gram = False
    needs_losses = True

    def weights(self, gram: Tensor) -> Tensor:
        raise TypeError(
            f"{type(self).__name__} weighs losses, not gradients: strategies call weigh(losses, step) before "
            "the backward instead of solving bucket Grams"
        )

    @abstractmethod
    def loss_weights(self, losses: Tensor) -> Tensor:
        """The T weights for this step's losses (float64, CPU); ``self.step`` is the optimizer step."""

    def weigh(self, losses: Tensor, step: int) -> Tensor:
        """Validate ``losses`` [T], run :meth:`loss_weights` and check its result (float64, CPU)."""
        self.losses = check_losses(losses, torch.as_tensor(losses).numel())
        self.bucket, self.step = _STATE, step
        w = torch.as_tensor(self.loss_weights(self.losses), dtype=torch.float64)
        if w.shape != self.losses.shape or not bool(torch.isfinite(w).all()):
            raise RuntimeError(f"{type(self).__name__} produced weights {w.tolist()} for losses {self.losses.tolist()}")
        return w


def _adam(state: dict[str, Any], key: str, param: Tensor, grad: Tensor, lr: float, weight_decay: float = 0.0,
          betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> Tensor:
    """One step of ``torch.optim.Adam`` (L2 weight decay added to the gradient) on a small tensor,
    its moments kept in ``state`` so that they are checkpointed with the weighting."""
    if weight_decay:
        grad = grad + weight_decay * param
    count = state.get(f"{key}_step", 0) + 1
    m = betas[0] * state.get(f"{key}_m", torch.zeros_like(param)) + (1 - betas[0]) * grad
    v = betas[1] * state.get(f"{key}_v", torch.zeros_like(param)) + (1 - betas[1]) * grad * grad
    state.update({f"{key}_step": count, f"{key}_m": m, f"{key}_v": v})
    m_hat, v_hat = m / (1 - betas[0] ** count), v / (1 - betas[1] ** count)
    return param - lr * m_hat / (v_hat.sqrt() + eps)


class UW(LossWeighting):
    """Uncertainty weighting (Kendall, Gal, Cipolla, "Multi-Task Learning Using Uncertainty to Weigh
    Losses for Scene Geometry and Semantics", CVPR 2018), in LibMTL's form: the objective
    ``Σ_t L_t / (2 e^{s_t}) + s_t / 2`` with a learned log-variance ``s_t`` per language, so the
    weights are ``w_t = 1 / (2 e^{s_t})``.

    The log-variances are trained alongside the model, one Adam step per optimizer step on that
    objective (``∂/∂s_t = 1/2 − L_t / (2 e^{s_t})``) with their own learning rate, after the step's
    weights are taken; they and the Adam moments are checkpointed. Keeping their optimizer here
    rather than in the model's leaves ZeRO's partitions and DDP's buckets untouched.

    Args:
        init: initial log-variance (LibMTL: -0.5).
        lr: Adam learning rate of the log-variances.
    """

    name = "uw"
    permutation_equivariant = True
    stateful = True

    def __init__(self, init: float = -0.5, lr: float = 1e-3) -> None:
        super().__init__()
        self.init, self.lr = init, lr

    def loss_weights(self, losses: Tensor) -> Tensor:
        state = self.bucket_state()
        s = state.get("log_var", torch.full_like(losses, self.init))
        w = 0.5 * torch.exp(-s)
        state["log_var"] = _adam(state, "adam", s, 0.5 - losses * w, self.lr)
        return w


class DWA(LossWeighting):
    """Dynamic weight average (Liu, Johns, Davison, "End-to-End Multi-Task Learning with Attention",
    CVPR 2019): ``w_t = T softmax_t(r_t / temperature)`` with ``r_t = L_t(s-1) / L_t(s-2)``, the rate
    at which each language's loss fell; ``w_t = 1`` for the first two steps.

    The paper (and LibMTL) use each epoch's average loss; here the ratios are of step losses
    averaged over windows of ``window`` optimizer steps (default 1: the step losses), since a
    bucket-level run has no epoch-level view of every language. Weights change once per window.

    Args:
        temperature: the paper's T = 2.
        window: optimizer steps averaged into one loss per language.
    """

    name = "dwa"
    permutation_equivariant = True
    stateful = True

    def __init__(self, temperature: float = 2.0, window: int = 1) -> None:
        super().__init__()
        if temperature <= 0 or window < 1:
            raise ValueError(f"DWA needs temperature > 0 and window >= 1, got {temperature}, {window}")
        self.temperature, self.window = temperature, window

    def loss_weights(self, losses: Tensor) -> Tensor:
        state = self.bucket_state()
        history: list[Tensor] = state.setdefault("window_means", [])  # the last two complete windows
        if len(history) < 2:
            w = torch.ones_like(losses)
        else:
            rate = history[-1] / history[-2]
            w = losses.numel() * torch.softmax(rate / self.temperature, 0)
        total = state.get("window_sum", torch.zeros_like(losses)) + losses
        count = state.get("window_count", 0) + 1
        if count == self.window:
            state["window_means"] = (history + [total / count])[-2:]
            total, count = torch.zeros_like(losses), 0
        state["window_sum"], state["window_count"] = total, count
        return w


class RLW(LossWeighting):
    """Random loss weighting (Lin, Ye, Xu, Shi, Zhang, "Reasonable Effectiveness of Random Weighting:
    A Litmus Test for Multi-Task Learning", TMLR 2022): ``w = softmax(z)``, ``z ~ N(0, I)`` drawn anew
    every step. The draw is a function of ``(seed, step)``, so every rank and a resumed run draw the
    same weights.

    Args:
        seed: base seed of the draws.
    """

    name = "rlw"
    stateful = False

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed

    def loss_weights(self, losses: Tensor) -> Tensor:
        z = np.random.default_rng([self.seed, self.step]).standard_normal(losses.numel())
        return torch.softmax(torch.from_numpy(z), 0)


class GLS(LossWeighting):
    """Geometric loss strategy (Chennupati, Sistu, Yogamani, Rawashdeh, "MultiNet++: Multi-Stream
    Feature Aggregation and Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops 2019):
    minimise the geometric mean ``(Π_t L_t)^{1/T}``, whose gradient is ``Σ_t w_t ∇L_t`` with
    ``w_t = (Π L)^{1/T} / (T L_t)``. Needs positive losses.
    """

    name = "gls"
    permutation_equivariant = True
    stateful = False

    def loss_weights(self, losses: Tensor) -> Tensor:
        if bool((losses <= 0).any()):
            raise ValueError(f"GLS takes the geometric mean of the losses, which must be positive: got {losses.tolist()}")
        geometric = torch.exp(torch.log(losses).mean())
        return geometric / (losses.numel() * losses)


class FAMO(LossWeighting):
    """Fast adaptive multitask optimization (Liu, Feng, Stone, Liu, "FAMO: Fast Adaptive Multitask
    Optimization", NeurIPS 2023). Logits ξ (z = softmax ξ) weigh the log-losses: the gradient of
    ``Σ_t z_t log(L_t − m_t) / c`` with ``c = Σ_t z_t / (L_t − m_t)`` gives ``w_t = z_t / (c (L_t − m_t))``.
    ξ follows the decrease of each log-loss: with ``δ_t = log(L_t(s-1) − m_t) − log(L_t(s) − m_t)``,
    one Adam step (lr ``gamma``, L2 weight decay ``decay``) along the softmax Jacobian's transpose
    times δ, i.e. ``z ⊙ (δ − zᵀδ)``.

    The paper measures δ on the same batch after the model's update (an extra forward); here it is
    the next step's losses, the variant without an extra forward. ``min_losses`` m default to 0.

    Args:
        gamma: Adam learning rate of the logits (paper: 0.025).
        decay: their weight decay (paper: 1e-3).
        min_losses: lower bounds m_t of the losses, e.g. 0 for cross-entropy.
        eps: keeps ``L_t − m_t`` away from 0 (paper: 1e-8).
    """

    name = "famo"
    permutation_equivariant = True
    stateful = True

    def __init__(self, gamma: float = 0.025, decay: float = 1e-3, min_losses: float = 0.0, eps: float = 1e-8) -> None:
        super().__init__()
        self.gamma, self.decay, self.min_losses, self.eps = gamma, decay, min_losses, eps

    def loss_weights(self, losses: Tensor) -> Tensor:
        state = self.bucket_state()
        shifted = losses - self.min_losses + self.eps
        if bool((shifted <= 0).any()):
            raise ValueError(f"FAMO needs losses above min_losses={self.min_losses}: got {losses.tolist()}")
        logits = state.get("logits", torch.zeros_like(losses))
        if "previous" in state:  # the logits' update for the decrease since the previous step
            delta = torch.log(state["previous"]) - torch.log(shifted)
            z = torch.softmax(logits, 0)
            logits = _adam(state, "adam", logits, z * (delta - (z * delta).sum()), self.gamma, self.decay)
        state["logits"], state["previous"] = logits, shifted
        z = torch.softmax(logits, 0)
        return z / ((z / shifted).sum() * shifted)


LOSS_WEIGHTINGS = (UW, DWA, RLW, GLS, FAMO)
