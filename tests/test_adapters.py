"""PEFT adapters on the module: what trains, what a checkpoint keeps, the errors, and the adapter
sizes the LoRA configs' memory arithmetic (docs/configs.md) is built on."""

from __future__ import annotations

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from lightning_moo.adapters import check_trainable, drop_frozen, trainable_names, with_adapter
from lightning_moo.module import MultilingualLM
from lightning_moo.strategies.bucket_count import bucket_numel_for
from test_cli_parsing import CONFIGS

TINY = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=64)
# Llama-3-8B's architecture (untied embeddings, vocabulary 128,256).
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)


def lora_numel(r: int, hidden: int, intermediate: int, kv: int, layers: int) -> int:
    """r · (in + out) per adapted linear layer: q, o (h→h), k, v (h→kv), gate, up (h→i), down (i→h)."""
    per_layer = 2 * (hidden + hidden) + 2 * (hidden + kv) + 3 * (hidden + intermediate)
    return r * per_layer * layers


def test_only_the_adapter_trains_and_its_forward_starts_at_the_base_model():
    torch.manual_seed(0)
    base = MultilingualLM(model_config=TINY, tokenizer="bytes")
    torch.manual_seed(0)
    lora = MultilingualLM(model_config=TINY, tokenizer="bytes", peft={"r": 4, "target_modules": ["q_proj", "v_proj"]})
    names = trainable_names(lora)
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert {n.split(".")[-4] for n in names} == {"q_proj", "v_proj"}
    # r · (in + out) for q (32→32) and v (32→16: one key/value head of 16), in 2 layers.
    assert sum(p.numel() for p in lora.parameters() if p.requires_grad) == 4 * ((32 + 32) + (32 + 16)) * 2
    # LoRA's B starts at zero: before training the adapted model is the base model.
    ids = torch.randint(0, 300, (2, 9))
    torch.testing.assert_close(lora(ids), base(ids), rtol=0, atol=0)


def test_checkpoints_keep_the_adapter_and_refuse_another_one():
    lora = MultilingualLM(model_config=TINY, tokenizer="bytes", peft={"r": 2, "target_modules": ["q_proj"]})
    checkpoint = {"state_dict": lora.state_dict()}
    lora.on_save_checkpoint(checkpoint)
    assert sorted(checkpoint["state_dict"]) == sorted(trainable_names(lora))
    assert checkpoint["trainable_parameters"] == trainable_names(lora)
    lora.on_load_checkpoint(checkpoint)  # the same adapter: accepted
    other = MultilingualLM(model_config=TINY, tokenizer="bytes", peft={"r": 2, "target_modules": ["v_proj"]})
    with pytest.raises(RuntimeError, match="Resume with the model.peft"):
        other.on_load_checkpoint(checkpoint)
    full = MultilingualLM(model_config=TINY, tokenizer="bytes")
    with pytest.raises(RuntimeError, match="trained other parameters"):
        check_trainable(checkpoint["trainable_parameters"], full)
    # Without an adapter nothing is frozen: the whole state dict stays.
    assert drop_frozen(full.state_dict(), full).keys() == full.state_dict().keys()


@pytest.mark.parametrize("spec, message", [
    ({"r": 4, "target_modules": ["no_such_proj"]}, "no_such_proj"),
    ({"r": 4, "target_modules": ["q_proj"], "not_a_field": 1}, "not a valid PEFT config"),
    ({"r": 4, "target_modules": ["q_proj"], "task_type": "SEQ_CLS"}, "must be CAUSAL_LM"),
])
def test_bad_adapter_configs_fail_with_the_field(spec, message):
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY, vocab_size=64))
    with pytest.raises(ValueError, match=message):
        with_adapter(model, spec)


def test_other_peft_types_by_name():
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY, vocab_size=64))
    adapted = with_adapter(model, {"peft_type": "ia3", "target_modules": ["k_proj", "v_proj", "down_proj"],
                                   "feedforward_modules": ["down_proj"]})
    assert all("ia3_l" in n for n, p in adapted.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["llama3_8b_lora_1gpu.yaml", "llama3_8b_lora_8gpu.yaml"])
def test_the_llama3_lora_configs_adapter_and_buckets_match_the_documented_arithmetic(name):
    """41,943,040 adapter elements (0.52% of 8.03B) in 32 buckets of 1,310,720: built on the meta
    device from the config's own peft fields, against the closed form r·(in + out) per layer."""
    cfg = yaml.safe_load((CONFIGS / name).read_text())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **LLAMA3_8B))
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248
    adapted = with_adapter(model, cfg["model"]["peft"])
    numel = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    assert numel == lora_numel(cfg["model"]["peft"]["r"], 4096, 14336, 1024, 32) == 41_943_040
    target = cfg["strategy"]["init_args"]["target_buckets"]
    assert bucket_numel_for(adapted, target) == 41_943_040 // 32 == 1_310_720
