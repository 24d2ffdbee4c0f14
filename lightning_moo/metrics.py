"""Gradient-conflict metrics computed from Gram matrices alone.

For T languages with gradients g_1..g_T over some parameter block, the T×T Gram matrix
G = [⟨g_i, g_j⟩] determines every quantity here: norms (√G_ii), cosines, the conflict ratio and the
min-norm point of the gradients' convex hull. Inner products split over disjoint blocks, so the Gram
of a union of buckets is the sum of their Grams (:func:`sum_grams`) — the whole model's Gram is
Σ_b G_b and needs no gradient beyond what the buckets already reduced.

Every function takes and returns float64 CPU tensors and never touches a parameter-sized tensor.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .buckets import BucketInfo
from .solvers.qp import min_norm_weights

MODULE_KINDS = ("embeddings", "attention", "mlp", "norms", "head", "other")

# Hugging Face Llama / Qwen / Mistral / GPT-2 style names. Norms are tested first: Qwen3's
# `self_attn.q_norm` is a norm weight even though it lives inside the attention module.
_KIND_PATTERNS = (
    ("norms", re.compile(r"(^|\.)([a-z_]*norm[a-z_0-9]*|ln_f|ln_\d+)\.")),
    ("embeddings", re.compile(r"(^|\.)(embed_tokens|embed_positions|wte|wpe|word_embeddings|embeddings?)\.")),
    ("attention", re.compile(r"(^|\.)(self_attn|attention|attn|cross_attn)\.")),
    ("mlp", re.compile(r"(^|\.)(mlp|feed_forward|ffn)\.")),
    ("head", re.compile(r"(^|\.)(lm_head|output|score|classifier)\.")),
)
_LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def _check_gram(gram: Tensor) -> None:
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] == 0:
        raise ValueError(f"expected a non-empty square T×T Gram matrix, got shape {tuple(gram.shape)}")


def grad_norms(gram: Tensor) -> Tensor:
    """Each language's gradient norm ‖g_t‖ = √G_tt (negative rounding noise on the diagonal → 0)."""
    _check_gram(gram)
    return gram.diagonal().clamp_min(0).sqrt()


def cosine_matrix(gram: Tensor) -> Tensor:
    """T×T cosines G_ij / (‖g_i‖‖g_j‖). A language with a zero gradient has cosine 0 with every
    other language (it neither helps nor hurts them), and 1 with itself."""
    norms = grad_norms(gram)
    denom = norms[:, None] * norms[None, :]
    cos = torch.where(denom > 0, gram / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(gram))
    # Rounding can push |cos| a few ulps past 1.
    cos = cos.clamp(-1.0, 1.0)
    cos.fill_diagonal_(1.0)
    return cos


def language_pairs(num_languages: int) -> list[tuple[int, int]]:
    """The unordered language pairs (i, j), i < j, in the column order every pair-valued result uses."""
    return [(i, j) for i in range(num_languages) for j in range(i + 1, num_languages)]


def pairwise_cosines(gram: Tensor) -> Tensor:
    """Cosines of the T(T-1)/2 pairs in :func:`language_pairs` order."""
    cos = cosine_matrix(gram)
    pairs = language_pairs(gram.shape[0])
    if not pairs:
        return cos.new_zeros(0)
    i, j = zip(*pairs)
    return cos[list(i), list(j)]


def mean_cosine(gram: Tensor) -> float:
    """Mean pairwise cosine; 1.0 for a single language (nothing conflicts)."""
    pc = pairwise_cosines(gram)
    return float(pc.mean()) if pc.numel() else 1.0


def min_cosine(gram: Tensor) -> float:
    """Most conflicting pair's cosine; 1.0 for a single language."""
    pc = pairwise_cosines(gram)
    return float(pc.min()) if pc.numel() else 1.0


def conflict_ratio(gram: Tensor) -> float:
    """Share of language pairs whose gradients have a negative inner product (cosine < 0)."""
    pc = pairwise_cosines(gram)
    return float((pc < 0).double().mean()) if pc.numel() else 0.0


def stationarity_gap(gram: Tensor) -> float:
    """‖min-norm point of conv{g_t}‖² = min over the simplex of wᵀGw (exact MGDA solve).

    Zero exactly when some convex combination of the gradients vanishes (Pareto stationarity);
    otherwise the min-norm direction lowers every language's loss to first order.
    """
    _check_gram(gram)
    g = gram.detach().to("cpu", torch.float64)
    w = torch.from_numpy(min_norm_weights(g.numpy()))
    return max(float(w @ g @ w), 0.0)


def sum_grams(grams: Iterable[Tensor]) -> Tensor:
    """Gram of the union of disjoint parameter blocks: the sum of their Grams."""
    grams = list(grams)
    if not grams:
        raise ValueError("no Gram matrices to sum")
    return torch.stack([g.to("cpu", torch.float64) for g in grams]).sum(0)


def bucket_level_gap(grams: Iterable[Tensor]) -> float:
    """Σ_b ‖min-norm point of bucket b‖²: the gap bucket-level MOO drives to zero.

    Never larger than the global gap ``stationarity_gap(sum_grams(grams))`` (each bucket picks its
    own weights, where the global problem must use one set for all), so a bucket-level gap near
    zero does not imply a globally Pareto-stationary point.
    """
    return sum(stationarity_gap(g) for g in grams)


def module_kind(name: str) -> str:
    """Module kind of a parameter from its Hugging Face style name; ``"other"`` when unknown."""
    dotted = name + "."  # every pattern ends with "."; a bare name like "lm_head" must match too
    for kind, pattern in _KIND_PATTERNS:
        if pattern.search(dotted):
            return kind
    return "other"


def layer_index(name: str) -> int | None:
    """Transformer block index of a parameter (``model.layers.3.mlp...`` → 3); None outside blocks."""
    match = _LAYER_PATTERN.search(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Piece:
    """A block of parameter elements with its Gram matrix and the solver weights applied to it."""

    gram: Tensor
    weights: Tensor
    numel: int

    @classmethod
    def of_bucket(cls, bucket: BucketInfo) -> "Piece":
        return cls(bucket.gram, bucket.weights, bucket.numel)


def group_pieces(buckets: Iterable[BucketInfo], by: str) -> dict[str, list[Piece]]:
    """Parameter blocks grouped by module kind (``by="kind"``) or transformer layer (``by="layer"``).

    A bucket that records one Gram per parameter (``param_grams``, as BucketMOOStrategy's buckets do)
    is split exactly among its parameters' groups. A bucket without them (the single global bucket
    of ``global_two_pass``) cannot be split: it joins a group only when all of its parameters belong
    to it, otherwise the group ``"mixed"`` (``"layer_mixed"``). Layer groups are named ``layer_<i>``;
    parameters outside any block (embeddings, final norm, head) form ``"layer_none"``.
    """
    if by == "kind":
        key, mixed = module_kind, "mixed"
    elif by == "layer":
        key, mixed = (lambda name: "layer_none" if (i := layer_index(name)) is None else f"layer_{i}"), "layer_mixed"
    else:
        raise ValueError(f"by must be 'kind' or 'layer', got {by!r}")
    groups: dict[str, list[Piece]] = {}
    for bucket in buckets:
        if bucket.param_grams is not None:
            for param, gram in zip(bucket.params, bucket.param_grams):
                groups.setdefault(key(param.name), []).append(Piece(gram, bucket.weights, param.end - param.start))
        else:
            keys = {key(p.name) for p in bucket.params}
            group = next(iter(keys)) if len(keys) == 1 else mixed
            groups.setdefault(group, []).append(Piece.of_bucket(bucket))
    return groups


def block_index(group: str) -> int | None:
    """The transformer block of a :func:`group_pieces` layer group (``"layer_3"`` → 3); None for
    ``layer_none``, ``layer_mixed`` and module-kind groups."""
    suffix = group.removeprefix("layer_")
    return int(suffix) if suffix.isdigit() else None


def mean_weights(pieces: Sequence[Piece]) -> Tensor:
    """The solver's weights averaged over pieces, each counted by its number of elements:
    the weight language t has on an average parameter element of the group."""
    numel = torch.tensor([float(p.numel) for p in pieces], dtype=torch.float64)
    weights = torch.stack([p.weights.to(torch.float64) for p in pieces])
    return (numel[:, None] * weights).sum(0) / numel.sum()


@dataclass(frozen=True)
class Directions:
    """K update directions over the same parameters, compared through the Grams (see
    :func:`compare_directions`)."""

    norms: Tensor  # [K] ‖d_k‖
    cosines: Tensor  # [K, K] cos(d_k, d_l); 0 where either direction is zero, 1 on the diagonal
    progress: Tensor  # [K, T] ⟨g_t, d_k⟩ / ‖d_k‖; 0 where d_k = 0


def compare_directions(grams: Sequence[Tensor], directions: Sequence[Tensor]) -> Directions:
    """Norms, cosines and per-language progress of directions known only by their weights per bucket.

    Direction k applies d_k,b = J_bᵀ W_k,b in bucket b (J_b: the T languages' gradients there), so
    with G_b = J_b J_bᵀ every inner product adds up over buckets: ⟨g_t, d_k⟩ = Σ_b (G_b W_k,b)_t and
    ⟨d_k, d_l⟩ = Σ_b W_k,bᵀ G_b W_l,b. ``directions[k]`` is W_k: a [B, T] tensor (one weight vector
    per bucket, as bucket-level solvers apply) or a [T] vector, the same in every bucket — a
    whole-model direction d = Jᵀw, such as a solver's on Σ_b G_b. ``progress[k, t]`` is the rate at
    which language t's loss falls per unit length of a step along d_k (its gradient norm times
    cos(g_t, d_k)); negative means d_k raises that loss to first order. O(K·B·T²) arithmetic.
    """
    if not grams or not directions:
        raise ValueError("compare_directions needs at least one Gram matrix and one direction")
    # NumPy: at these sizes a torch op costs more than its arithmetic, and on a machine whose cores
    # are busy training, torch's intra-op threads can wait for each other far longer still.
    G = np.stack([g.detach().to("cpu", torch.float64).numpy() for g in grams])  # [B, T, T]
    B, T = G.shape[0], G.shape[1]
    W = np.stack([np.broadcast_to(w.detach().to("cpu", torch.float64).numpy(), (B, T)) for w in directions])  # [K, B, T]
    GW = np.einsum("bij,kbj->kbi", G, W)  # ⟨g_b,t, d_k,b⟩
    inner = W.reshape(len(W), -1) @ GW.reshape(len(W), -1).T  # the Gram of the directions
    inner = torch.from_numpy(0.5 * (inner + inner.T))
    norms = inner.diagonal().clamp_min(0).sqrt()
    along = torch.from_numpy(GW.sum(1))  # [K, T]: ⟨g_t, d_k⟩
    progress = torch.where(norms[:, None] > 0, along / torch.where(norms > 0, norms, 1.0)[:, None], 0.0)
    return Directions(norms, cosine_matrix(inner), progress)
