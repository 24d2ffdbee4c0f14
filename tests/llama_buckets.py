"""Bucket records shaped like an 8B Llama's under ZeRO: named parameters of a 32-block decoder, packed
in backward order into buckets, each with exact per-parameter Grams of random per-language gradients."""

from __future__ import annotations

import torch

from lightning_moo.buckets import BucketInfo, ParamRange

_BLOCK = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
          "mlp.down_proj", "input_layernorm", "post_attention_layernorm")


def llama_parameter_names(layers: int) -> list[str]:
    """``named_parameters()`` order of a Hugging Face LlamaForCausalLM wrapped as ``model.`` in a LightningModule."""
    names = ["model.model.embed_tokens.weight"]
    names += [f"model.model.layers.{i}.{p}.weight" for i in range(layers) for p in _BLOCK]
    return names + ["model.model.norm.weight", "model.lm_head.weight"]


def llama_buckets(layers: int = 32, buckets: int = 160, languages: int = 8, seed: int = 0, step: int = 0):
    """(buckets, names, per-language gradient blocks): ``buckets`` BucketInfos in reduction order (head
    first), the parameter names, and the T × n gradient of every parameter (so a test can recompute)."""
    names = llama_parameter_names(layers)
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(1, 6, generator=g, dtype=torch.float64)
    grads = {}
    for name in names:
        block = torch.randn(languages, 6, generator=g, dtype=torch.float64) + shared
        block[languages // 2 :] *= -0.5  # half of the languages pull against the shared direction
        grads[name] = block
    order = list(reversed(names))  # backward order
    bounds = [len(order) * b // buckets for b in range(buckets + 1)]
    weights = torch.softmax(torch.randn(buckets, languages, generator=g, dtype=torch.float64), dim=1)
    out = []
    for b in range(buckets):
        members = order[bounds[b] : bounds[b + 1]]
        params, offset = [], 0
        for name in members:
            params.append(ParamRange(name, offset, offset + 6))
            offset += 6
        param_grams = torch.stack([grads[n] @ grads[n].T for n in members])
        out.append(BucketInfo(b, tuple(params), offset, param_grams.sum(0), weights[b], step, param_grams))
    return out, names, grads
