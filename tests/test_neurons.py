"""LAPE: planted language neurons are found, and every number matches a numpy computation from MLP
inputs the test records itself (one unpadded sentence at a time)."""

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Qwen3Config, Qwen3ForCausalLM

from lightning_moo.callbacks.neurons import NeuronSpecificity, activation_probabilities, gated_mlps, select_language_neurons
from tiny_lm import LANGUAGES, WORDS_PER_LANGUAGE, TinyLM, make_llama, make_texts, make_tokenizer, token_id

# Embedding dimensions of the planted model: one indicator per language, one shared by every token,
# one that is +1 on even token ids and -1 on odd ones.
COMMON, PARITY = len(LANGUAGES), len(LANGUAGES) + 1
PLANTED = {0: {0: 5, 1: 17, 2: 40}, 1: {0: 2, 1: 45, 2: 60}}  # layer -> language -> neuron
ALL_LANGUAGES = {0: 8, 1: 9}  # fires on every token
TWO_LANGUAGES = {0: 11, 1: 12}  # fires on languages 0 and 1
PARITY_ROWS = range(20, 40)  # fire on about half the tokens of every language


def planted_llama():
    """Attention and MLP outputs are zeroed, so every MLP sees the normalised embedding; the gate rows
    then read chosen embedding dimensions, which fixes on which tokens each neuron fires."""
    model = make_llama(intermediate=64)
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        embed.zero_()
        embed[:, COMMON] = 1.0
        embed[:, PARITY] = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(embed.shape[0])])
        for j in range(len(LANGUAGES)):
            embed[token_id(j, 0) : token_id(j, WORDS_PER_LANGUAGE), j] = 1.0
        # Padding looks like language 0: were padded positions counted, language 0's neuron would fire
        # for the other languages too.
        embed[0, 0] = 1.0
        for layer, block in enumerate(model.model.layers):
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
            gate = block.mlp.gate_proj.weight
            gate.zero_()
            gate[:, COMMON] = -4.0  # by default a neuron never fires
            for language, row in PLANTED[layer].items():
                gate[row, COMMON] = 0.0
                gate[row, language] = 4.0
            gate[ALL_LANGUAGES[layer], COMMON] = 4.0
            gate[TWO_LANGUAGES[layer], COMMON] = 0.0
            gate[TWO_LANGUAGES[layer], [0, 1]] = 4.0
            for row in PARITY_ROWS:
                gate[row, COMMON] = 0.0
                gate[row, PARITY] = 1.0 + row / 10
    return model


def recorded_gates(model, tokenizer, texts):
    """Per language, per layer: gate pre-activations [tokens, neurons] in float64, computed in numpy
    from the MLP inputs recorded with the test's own hooks, one sentence at a time (so no padding)."""
    blocks = model.model.layers
    inputs = {}
    handles = [
        block.mlp.register_forward_pre_hook(lambda _m, args, i=i: inputs.__setitem__(i, args[0][0].double().numpy()))
        for i, block in enumerate(blocks)
    ]
    weights = [block.mlp.gate_proj.weight.detach().double().numpy() for block in blocks]
    gates = []
    try:
        with torch.no_grad():
            for sentences in texts.values():
                per_layer = [[] for _ in blocks]
                for sentence in sentences:
                    model(input_ids=torch.tensor([tokenizer(sentence)["input_ids"]]))
                    for i in range(len(blocks)):
                        per_layer[i].append(inputs[i] @ weights[i].T)
                gates.append([np.concatenate(g) for g in per_layer])
    finally:
        for handle in handles:
            handle.remove()
    return gates


def reference_lape(gates, share, quantile):
    """LAPE as the paper states it, in numpy: returns probabilities, entropy, threshold, selected
    (layer, neuron) pairs and their languages."""
    silu = lambda g: g / (1.0 + np.exp(-g))  # noqa: E731
    probs = np.stack([np.stack([(silu(g) > 0).mean(axis=0) for g in layers]) for layers in gates], axis=-1)
    totals = probs.sum(axis=-1, keepdims=True)
    normed = np.divide(probs, totals, out=np.zeros_like(probs), where=totals > 0)
    logs = np.log(normed, out=np.zeros_like(normed), where=normed > 0)
    entropy = -(normed * logs).sum(axis=-1)
    ordered = np.sort(probs.ravel())
    threshold = ordered[round(ordered.size * quantile) - 1]
    candidate = (probs > threshold).any(axis=-1)
    keep = min(round(entropy.size * share), int(candidate.sum()))
    ranked = np.argsort(np.where(candidate, entropy, np.inf).ravel(), kind="stable")[:keep]
    selected = {divmod(int(k), entropy.shape[1]) for k in ranked}
    languages = {(l, n): {LANGUAGES[j] for j in np.flatnonzero(probs[l, n] > threshold)} for l, n in selected}
    return probs, entropy, threshold, selected, languages


def selection_of(result):
    layers, neurons = torch.nonzero(result.selected, as_tuple=True)
    return {
        (int(l), int(n)): {lang for j, lang in enumerate(result.languages) if result.assignment[l, n, j]}
        for l, n in zip(layers, neurons)
    }


def test_planted_neurons_are_found_and_assigned():
    model, tokenizer, texts = planted_llama(), make_tokenizer(), make_texts(sentences=16)
    probs = activation_probabilities(model, tokenizer, texts, batch_size=5)
    planted = {(layer, row): {LANGUAGES[j]} for layer, rows in PLANTED.items() for j, row in rows.items()}
    for (layer, row), (lang,) in planted.items():
        expected = [1.0 if name == lang else 0.0 for name in LANGUAGES]
        assert probs[layer, row].tolist() == expected  # padding (language 0 lookalike) not counted
    total = probs.shape[0] * probs.shape[1]

    exact = select_language_neurons(probs, LANGUAGES, top_share=len(planted) / total)
    assert selection_of(exact) == planted

    wider = select_language_neurons(probs, LANGUAGES, top_share=(len(planted) + 2) / total)
    two = {(layer, row): {LANGUAGES[0], LANGUAGES[1]} for layer, row in TWO_LANGUAGES.items()}
    assert selection_of(wider) == planted | two
    assert np.allclose(wider.entropy[0, TWO_LANGUAGES[0]].item(), np.log(2))
    assert np.allclose(wider.entropy[0, ALL_LANGUAGES[0]].item(), np.log(3))


def test_lape_matches_numpy_on_recorded_activations():
    model, tokenizer, texts = make_llama(seed=3), make_tokenizer(), make_texts(sentences=10, seed=4)
    probs = activation_probabilities(model, tokenizer, texts, batch_size=4)
    result = select_language_neurons(probs, LANGUAGES, top_share=0.05, quantile=0.9)
    ref_probs, ref_entropy, ref_threshold, ref_selected, ref_languages = reference_lape(
        recorded_gates(model, tokenizer, texts), share=0.05, quantile=0.9
    )
    np.testing.assert_allclose(result.probabilities.numpy(), ref_probs, atol=1e-12)
    np.testing.assert_allclose(result.entropy.numpy(), ref_entropy, atol=1e-12)
    assert result.threshold == pytest.approx(ref_threshold, abs=1e-12)
    assert len(ref_selected) == round(ref_entropy.size * 0.05)
    assert selection_of(result) == ref_languages


def test_qwen_style_mlps_are_found():
    config = Qwen3Config(
        vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
    )
    model = Qwen3ForCausalLM(config).eval()
    assert gated_mlps(model) == [layer.mlp for layer in model.model.layers]
    probs = activation_probabilities(model, make_tokenizer(), make_texts(sentences=3))
    assert probs.shape == (3, 48, len(LANGUAGES))


def test_model_without_gate_is_refused_at_setup():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    texts = make_texts(sentences=2)
    module = TinyLM(model, make_tokenizer(), texts)
    with pytest.raises(TypeError, match="GPT2LMHeadModel has no gated MLP.*gate_proj"):
        NeuronSpecificity(texts).setup(None, module, "fit")


def test_an_absolute_entropy_threshold_counts_the_specific_neurons_instead_of_fixing_their_share():
    """With entropy_threshold the selection is every candidate at most that entropy, so a model with
    more sharply language-specific neurons reports more of them (a fixed top_share reports the same
    number whatever the model); checked against entropies computed one neuron at a time."""
    import math

    rng = np.random.default_rng(0)
    languages = ["a", "b", "c", "d"]

    def planted(sharp: int) -> torch.Tensor:
        probs = rng.uniform(0.2, 0.3, size=(2, 50, 4))  # every neuron fires about equally everywhere ...
        for k in range(sharp):  # ... except `sharp` that fire in one language only
            layer, neuron = divmod(k, 50)
            probs[layer, neuron] = [0.9, 0.01, 0.01, 0.01]
        return torch.from_numpy(probs)

    counts = {}
    for sharp in (3, 12):
        probs = planted(sharp)
        by_threshold = select_language_neurons(probs, languages, quantile=0.9, entropy_threshold=0.5)
        by_share = select_language_neurons(probs, languages, top_share=0.05, quantile=0.9)
        # One neuron at a time: entropy of its normalised probabilities, a candidate above the threshold.
        expected = set()
        for layer in range(2):
            for neuron in range(50):
                p = probs[layer, neuron].tolist()
                q = [x / sum(p) for x in p]
                entropy = -sum(x * math.log(x) for x in q if x > 0)
                if max(p) > by_threshold.threshold and entropy <= 0.5:
                    expected.add((layer, neuron))
        assert {tuple(i) for i in torch.nonzero(by_threshold.selected).tolist()} == expected
        counts[sharp] = (int(by_threshold.selected.sum()), int(by_share.selected.sum()))
    assert counts[3][0] == 3 and counts[12][0] == 12  # the planted neurons, counted
    assert counts[3][1] == counts[12][1] == 5  # 5% of 100, whatever the model
    with pytest.raises(ValueError, match="entropy_threshold is an entropy in nats"):
        NeuronSpecificity({"a": ["x"]}, entropy_threshold=-1.0)
