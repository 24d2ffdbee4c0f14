"""Aligned-MTL (Senushkin et al., CVPR 2023): align the gradients' principal components."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

from .base import MOOSolver
from .qp import eigh


class AlignedMTL(MOOSolver):
    """Replace J by ``σ · U Vᵀ`` (its SVD with all singular values set to one scale ``σ``) and
    sum the aligned gradients. On the Gram matrix ``G = V Λ Vᵀ`` this is
    ``w = σ V Λ^{-1/2} Vᵀ 1``; eigenvalues below ``T·eps_f32·λ_max`` count as zero (paper's code).

    Args:
        scale: ``"min"`` (paper default, σ = the smallest non-zero singular value),
            ``"median"`` or ``"rmse"`` (root mean of the non-zero eigenvalues).

    Declarations: scale-invariant (``σ`` scales as ``Λ^{1/2}``); permutation-equivariant;
    stateless. Not conflict-free: ``G w = σ V Λ^{1/2} Vᵀ 1`` can have negative entries.
    """

    name = "alignedmtl"
    scale_invariant = True
    permutation_equivariant = True
    stateful = False

    def __init__(self, scale: Literal["min", "median", "rmse"] = "min") -> None:
        super().__init__()
        if scale not in ("min", "median", "rmse"):
            raise ValueError(f"AlignedMTL scale must be 'min', 'median' or 'rmse', got {scale!r}")
        self.scale = scale

    def weights(self, gram: Tensor) -> Tensor:
        # NumPy rather than torch: at T ≤ a few dozen every torch op costs more than its arithmetic.
        G = gram.numpy()
        T = G.shape[0]
        lam, V = eigh(G)
        keep = lam > lam.max() * T * np.finfo(np.float32).eps
        lam, V = lam[keep], V[:, keep]
        sigma = np.sqrt({"min": lam.min(), "median": np.median(lam), "rmse": lam.mean()}[self.scale])
        return torch.from_numpy(sigma * (V @ (V.sum(axis=0) / np.sqrt(lam))))
