"""PEFT adapters (LoRA, IA3, ...) on the fine-tuned model, and checkpoints that hold only what trains.

``peft`` is an optional dependency (``pip install lightning-moo[peft]``): imported only when an
adapter is asked for.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

# The key under which a checkpoint lists the parameters it trained (a resume checks it).
TRAINABLE = "trainable_parameters"


def with_adapter(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """``model`` wrapped as a ``peft.PeftModel`` whose only trainable parameters are the adapter's.

    ``spec`` holds a PEFT config's fields; ``peft_type`` (default ``LORA``) picks the adapter. The
    task type is always a causal LM.
    """
    try:
        from peft import get_peft_config, get_peft_model
    except ImportError as error:
        raise ImportError("model.peft needs the peft package: pip install 'lightning-moo[peft]'") from error
    fields = dict(spec)
    fields.setdefault("peft_type", "LORA")
    fields["peft_type"] = str(fields["peft_type"]).upper()
    if fields.setdefault("task_type", "CAUSAL_LM") != "CAUSAL_LM":
        raise ValueError(f"model.peft.task_type must be CAUSAL_LM (the model is a causal LM), got {fields['task_type']!r}")
    try:
        config = get_peft_config(fields)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"model.peft {spec!r} is not a valid PEFT config: {error}") from error
    with warnings.catch_warnings():
        # peft asks transformers 5 for is_gradient_checkpointing under its deprecated name.
        warnings.filterwarnings("ignore", message=".*`is_gradient_checkpointing` is deprecated")
        adapted = get_peft_model(model, config)
    if not any(p.requires_grad for p in adapted.parameters()):
        raise ValueError(f"model.peft {spec!r} matched no module of {type(model).__name__}: check target_modules")
    return adapted


def frozen_names(module: nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if not p.requires_grad}


def trainable_names(module: nn.Module) -> list[str]:
    return [name for name, p in module.named_parameters() if p.requires_grad]


def drop_frozen(state_dict: dict[str, Any], module: nn.Module) -> dict[str, Any]:
    """``state_dict`` without the frozen parameters of ``module`` (buffers and trainable ones kept)."""
    frozen = frozen_names(module)
    return {key: value for key, value in state_dict.items() if key not in frozen}


def trainable_difference(saved: list[str], module: nn.Module) -> Optional[str]:
    """How the parameters a checkpoint trained differ from those ``module`` trains, in words; None
    when they are the same (another adapter config, or a full fine-tune against an adapter, differ)."""
    current = trainable_names(module)
    if saved == current:
        return None
    missing, extra = sorted(set(current) - set(saved)), sorted(set(saved) - set(current))
    return (f"({len(saved)} in the checkpoint, {len(current)} in the model; not in the checkpoint: {missing[:3]}, "
            f"only in the checkpoint: {extra[:3]})")


def check_trainable(saved: list[str], module: nn.Module) -> None:
    """Refuse a checkpoint that trained other parameters than ``module`` trains: a non-strict load
    would skip them silently."""
    difference = trainable_difference(saved, module)
    if difference is not None:
        raise RuntimeError(f"the checkpoint trained other parameters than this model trains {difference}. "
                           "Resume with the model.peft (and model) settings the checkpoint was trained with.")


def saved_trainable(checkpoint_dir: Any) -> Optional[list[str]]:
    """The parameter names a DeepSpeed checkpoint directory lists as trained; None for a checkpoint
    from before that list, or without a model-states file (DeepSpeed then names what is missing).
    Memory-mapped: the weights are not read."""
    directory = Path(checkpoint_dir)
    latest = directory / "latest"
    tag = latest.read_text().strip() if latest.is_file() else "checkpoint"  # Lightning's tag
    states = directory / tag / "mp_rank_00_model_states.pt"
    if not states.is_file():
        return None
    return torch.load(states, map_location="cpu", mmap=True, weights_only=False).get(TRAINABLE)


def check_deepspeed_checkpoint(path: Any, module: nn.Module) -> None:
    """``check_trainable`` for a DeepSpeed checkpoint directory, before DeepSpeed loads it (whose own
    error for a different set of parameters is about "parameter-alignment layout")."""
    saved = saved_trainable(path)
    if saved is not None:
        check_trainable(saved, module)
