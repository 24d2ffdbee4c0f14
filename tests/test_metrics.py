"""Gram-based conflict metrics against direct computations on explicit gradient vectors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch.nn.functional import cosine_similarity

from lightning_moo import metrics
from lightning_moo.buckets import BucketInfo, ParamRange


def gradients(T: int, D: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(D, generator=g, dtype=torch.float64)
    # A small shared part: some pairs agree, some conflict.
    return 0.3 * shared + torch.randn(T, D, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("T,seed", [(2, 0), (3, 1), (4, 2), (5, 3), (6, 4)])
def test_cosines_ratio_norms_match_the_gradient_vectors(T, seed):
    J = gradients(T, 50, seed)
    G = J @ J.T
    pairs = list(itertools.combinations(range(T), 2))
    direct = torch.stack([cosine_similarity(J[i], J[j], dim=0) for i, j in pairs])
    assert metrics.language_pairs(T) == pairs
    torch.testing.assert_close(metrics.pairwise_cosines(G), direct, rtol=0, atol=1e-12)
    assert metrics.mean_cosine(G) == pytest.approx(float(direct.mean()), abs=1e-12)
    assert metrics.min_cosine(G) == pytest.approx(float(direct.min()), abs=1e-12)
    negative = sum(float(J[i] @ J[j]) < 0 for i, j in pairs)
    assert metrics.conflict_ratio(G) == negative / len(pairs)
    torch.testing.assert_close(metrics.grad_norms(G), J.norm(dim=1), rtol=1e-12, atol=0)
    full = torch.stack([torch.stack([cosine_similarity(J[i], J[j], dim=0) for j in range(T)]) for i in range(T)])
    torch.testing.assert_close(metrics.cosine_matrix(G), full, rtol=0, atol=1e-12)


def test_conflict_ratio_counts_exactly_the_opposed_pairs():
    # Pairs (0,1) and (1,2) point apart, (0,2) agree: 2 of 3 pairs conflict.
    J = torch.tensor([[1.0, 0.0], [-1.0, 0.1], [1.0, 1.0]], dtype=torch.float64)
    G = J @ J.T
    assert metrics.conflict_ratio(G) == pytest.approx(2 / 3)
    assert metrics.min_cosine(G) == pytest.approx(-1 / float(torch.tensor([1.0, 0.1]).norm()))


def test_zero_gradient_is_orthogonal_to_every_language():
    J = torch.tensor([[1.0, 2.0], [0.0, 0.0], [-1.0, 0.2]], dtype=torch.float64)
    cos = metrics.cosine_matrix(J @ J.T)
    assert cos[0, 1] == 0 and cos[1, 2] == 0 and cos[1, 1] == 1
    assert metrics.conflict_ratio(J @ J.T) == pytest.approx(1 / 3)  # only (0, 2) conflicts


def brute_force_min_norm(G: np.ndarray) -> float:
    """min over the simplex of wᵀGw by enumerating supports: on each support the minimiser of the
    equality-constrained problem solves the KKT system [[2G_S, 1], [1ᵀ, 0]]; keep those with w ≥ 0.
    Some support of size ≤ T holds the optimum (Carathéodory), so the minimum over supports is exact."""
    T = G.shape[0]
    best = np.inf
    for k in range(1, T + 1):
        for support in itertools.combinations(range(T), k):
            S = list(support)
            kkt = np.zeros((k + 1, k + 1))
            kkt[:k, :k] = 2 * G[np.ix_(S, S)]
            kkt[:k, k] = kkt[k, :k] = 1
            rhs = np.zeros(k + 1)
            rhs[k] = 1
            w_s = np.linalg.lstsq(kkt, rhs, rcond=None)[0][:k]
            if abs(w_s.sum() - 1) > 1e-9 or (w_s < -1e-12).any():
                continue
            w = np.zeros(T)
            w[S] = np.clip(w_s, 0, None)
            w /= w.sum()
            best = min(best, float(w @ G @ w))
    return best


@pytest.mark.parametrize("T,D,seed", [(2, 5, 0), (3, 2, 1), (3, 10, 2), (4, 3, 3), (4, 20, 4), (5, 4, 5)])
def test_stationarity_gap_equals_brute_force(T, D, seed):
    J = gradients(T, D, seed)
    G = J @ J.T
    assert metrics.stationarity_gap(G) == pytest.approx(brute_force_min_norm(G.numpy()), rel=1e-9, abs=1e-12)


def test_stationarity_gap_is_zero_when_a_convex_combination_vanishes():
    J = torch.tensor([[1.0, 2.0, 0.0], [-2.0, -4.0, 0.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    assert metrics.stationarity_gap(J @ J.T) == pytest.approx(0.0, abs=1e-12)


def test_bucket_level_gap_can_vanish_while_the_global_gap_does_not():
    # One coordinate per bucket, g1 = (1, 1), g2 = (-1, -3): each bucket's hull holds 0,
    # but the whole model's min-norm point is 0.7·g1 + 0.3·g2 = (0.4, -0.2), squared norm 0.2.
    J = torch.tensor([[1.0, 1.0], [-1.0, -3.0]], dtype=torch.float64)
    grams = [J[:, b : b + 1] @ J[:, b : b + 1].T for b in range(2)]
    assert metrics.bucket_level_gap(grams) == pytest.approx(0.0, abs=1e-15)
    assert metrics.stationarity_gap(metrics.sum_grams(grams)) == pytest.approx(0.2, rel=1e-12)


def test_sum_of_bucket_grams_is_the_gram_of_the_whole_gradient():
    J = gradients(3, 30, 7)
    bounds = [0, 4, 17, 30]
    grams = [J[:, a:b] @ J[:, a:b].T for a, b in zip(bounds, bounds[1:])]
    torch.testing.assert_close(metrics.sum_grams(grams), J @ J.T, rtol=1e-13, atol=0)


def test_module_kinds_and_layers_of_llama_and_qwen3_parameter_names():
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    size = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    expected = {
        "model.embed_tokens.weight": ("embeddings", None),
        "model.layers.1.self_attn.q_proj.weight": ("attention", 1),
        "model.layers.0.self_attn.o_proj.weight": ("attention", 0),
        "model.layers.0.mlp.gate_proj.weight": ("mlp", 0),
        "model.layers.1.mlp.down_proj.weight": ("mlp", 1),
        "model.layers.0.input_layernorm.weight": ("norms", 0),
        "model.layers.1.post_attention_layernorm.weight": ("norms", 1),
        "model.norm.weight": ("norms", None),
        "lm_head.weight": ("head", None),
    }
    for model in (LlamaForCausalLM(LlamaConfig(**size, tie_word_embeddings=False)), Qwen3ForCausalLM(Qwen3Config(**size, head_dim=8, tie_word_embeddings=False))):
        names = [n for n, _ in model.named_parameters()]
        assert set(expected) <= set(names)
        for name, (kind, layer) in expected.items():
            assert (metrics.module_kind(name), metrics.layer_index(name)) == (kind, layer), name
        assert all(metrics.module_kind(n) != "other" for n in names), names
    # Qwen3's per-head q/k norms are norms, though they live in the attention module.
    assert metrics.module_kind("model.layers.0.self_attn.q_norm.weight") == "norms"
    assert metrics.module_kind("net.0.weight") == "other" and metrics.layer_index("net.0.weight") is None


def bucket(index: int, names: list[str], sizes: list[int], J: torch.Tensor, offset: int, weights, per_param: bool) -> BucketInfo:
    """A bucket over columns offset… of J; with ``per_param`` it also records each parameter's Gram."""
    params, start = [], 0
    for name, size in zip(names, sizes):
        params.append(ParamRange(name, start, start + size))
        start += size
    block = J[:, offset : offset + start]
    param_grams = torch.stack([block[:, p.start : p.end] @ block[:, p.start : p.end].T for p in params]) if per_param else None
    return BucketInfo(index, tuple(params), start, block @ block.T, torch.tensor(weights, dtype=torch.float64), 0, param_grams)


LAYOUT = [  # (index, names, sizes, first column, weights)
    (0, ["lm_head.weight", "model.norm.weight"], [10, 2], 0, [0.3, 0.7]),  # head + norm
    (1, ["model.layers.1.mlp.up_proj.weight"], [8], 12, [0.5, 0.5]),
    (2, ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.input_layernorm.weight"], [6, 6], 20, [0.9, 0.1]),
    (3, ["model.layers.0.mlp.up_proj.weight"], [8], 32, [0.2, 0.8]),
]


def gram_of(J: torch.Tensor, *column_ranges: tuple[int, int]) -> torch.Tensor:
    cols = torch.cat([J[:, a:b] for a, b in column_ranges], dim=1)
    return cols @ cols.T


def test_grouping_splits_buckets_exactly_by_parameter():
    """With per-parameter Grams every kind and layer gets exactly its own columns' Gram (computed
    here from J), even for buckets that mix kinds."""
    J = gradients(2, 40, 9)
    buckets = [bucket(i, n, z, J, o, w, per_param=True) for i, n, z, o, w in LAYOUT]
    kinds = metrics.group_pieces(buckets, "kind")
    assert set(kinds) == {"head", "norms", "mlp", "attention"}
    expected = {"head": [(0, 10)], "norms": [(10, 12), (26, 32)], "mlp": [(12, 20), (32, 40)], "attention": [(20, 26)]}
    for kind, ranges in expected.items():
        torch.testing.assert_close(metrics.sum_grams(p.gram for p in kinds[kind]), gram_of(J, *ranges), rtol=1e-13, atol=1e-13)
    # norms: 2 elements at bucket 0's weights (0.3, 0.7) and 6 at bucket 2's (0.9, 0.1).
    torch.testing.assert_close(metrics.mean_weights(kinds["norms"]), torch.tensor([(2 * 0.3 + 6 * 0.9) / 8, (2 * 0.7 + 6 * 0.1) / 8], dtype=torch.float64))
    layers = metrics.group_pieces(buckets, "layer")
    torch.testing.assert_close(metrics.sum_grams(p.gram for p in layers["layer_0"]), gram_of(J, (20, 32), (32, 40)), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(metrics.sum_grams(p.gram for p in layers["layer_none"]), gram_of(J, (0, 12)), rtol=1e-13, atol=1e-13)


def test_grouping_without_parameter_grams_sends_straddling_buckets_to_mixed():
    J = gradients(2, 40, 9)
    buckets = [bucket(i, n, z, J, o, w, per_param=False) for i, n, z, o, w in LAYOUT]
    kinds = metrics.group_pieces(buckets, "kind")
    assert {k: len(v) for k, v in kinds.items()} == {"mixed": 2, "mlp": 2}
    torch.testing.assert_close(metrics.sum_grams(p.gram for p in kinds["mlp"]), gram_of(J, (12, 20), (32, 40)), rtol=1e-13, atol=1e-13)
    layers = metrics.group_pieces(buckets, "layer")
    assert {k: len(v) for k, v in layers.items()} == {"layer_none": 1, "layer_1": 1, "layer_0": 2}
    # Weight per element: 12 elements at (0.9, 0.1) and 8 at (0.2, 0.8).
    torch.testing.assert_close(metrics.mean_weights(layers["layer_0"]), torch.tensor([(12 * 0.9 + 8 * 0.2) / 20, (12 * 0.1 + 8 * 0.8) / 20], dtype=torch.float64))
    with pytest.raises(ValueError, match="'kind' or 'layer'"):
        metrics.group_pieces(buckets, "module")


def test_malformed_gram_is_refused():
    with pytest.raises(ValueError, match="square"):
        metrics.grad_norms(torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="no Gram"):
        metrics.sum_grams([])
