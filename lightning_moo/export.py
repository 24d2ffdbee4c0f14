"""``lightning-moo export``: a training checkpoint as a Hugging Face model directory.

    lightning-moo export --config run.yaml --ckpt_path <run>/checkpoints/last.ckpt --out hf/
    lightning-moo export --config run.yaml --ckpt_path <run>/checkpoints/last.ckpt --out hf/ --adapter

The model is built from the fit config as ``fit`` builds it (the CLI's own parser, the seed set
before the classes are instantiated, so that a frozen base from ``model_config`` is the run's random
init again), then the checkpoint's weights are loaded into it: a DeepSpeed checkpoint directory
through DeepSpeed's own consolidation (ZeRO partitions, frozen parameters left out at save), a
single-file (DDP) checkpoint through its ``state_dict``. It is written with ``save_pretrained``:

* by default the full model (a PEFT adapter merged into its base), loadable with
  ``AutoModelForCausalLM.from_pretrained(out)``;
* with ``--adapter`` the PEFT adapter alone, loadable with ``PeftModel.from_pretrained(base, out)``;
  a base that exists nowhere else (random init from ``model_config``, or dequantised from GGUF) is
  written to ``out/base``, and the adapter's ``base_model_name_or_path`` points there (absolute).

The tokenizer goes with either. Everything runs in one process: no Trainer, no devices.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_only
from rich.console import Console
from torch import Tensor

from .adapters import TRAINABLE, saved_trainable, trainable_difference, trainable_names
from .cli import MOOCLI
from .data import MultilingualDataModule
from .hf import _split_gguf
from .module import MultilingualLM

DESCRIPTION = "Write a checkpoint of a lightning-moo run as a Hugging Face model directory (save_pretrained)."
EPILOG = """\
By default the full model is written (a PEFT adapter merged into its base): safetensors weights,
config.json, generation_config.json and the tokenizer. With --adapter, a PEFT adapter alone
(adapter_config.json, adapter_model.safetensors, tokenizer) and, when the base model exists nowhere
else (model.model_config or a GGUF file), the base in OUT/base. Any other option overrides the
config as it would for fit (e.g. --model.dtype=bfloat16)."""


class ExportError(Exception):
    """A checkpoint, directory or setting that cannot be exported; the message says the fix."""


class ModelOnlyCLI(MOOCLI):
    """A fit config parsed and instantiated as ``fit`` does it (the seed first, then the classes in
    the same order), without a Trainer: the export runs in this process, on no accelerator."""

    def __init__(self, *args: Any, adapter: bool = False, **kwargs: Any) -> None:
        self.adapter = adapter
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        # The config.yaml that fit saves next to its logs also holds the arguments of Trainer.fit
        # (ckpt_path: the run it resumed from, weights_only). They must parse; they are ignored:
        # export's own --ckpt_path says what to export.
        parser.add_method_arguments(Trainer, "fit", skip=set(self.subcommands()["fit"]))

    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        # Refused here, before the model is built: loading a large base takes minutes.
        if self.adapter and self.config.model.peft is None:
            raise ExportError("--adapter needs an adapter, but the config sets no model.peft: "
                              "export the full model (leave out --adapter), or pass the config the run was trained with")

    def instantiate_trainer(self, **kwargs: Any) -> None:
        return None  # a Trainer would set up the config's devices and strategy, which export never uses


def build_module(config_args: list[str], adapter: bool = False) -> MultilingualLM:
    """The LightningModule of a fit config (``--config FILE`` and overrides, as for ``fit``)."""
    with warnings.catch_warnings():
        # Lightning warns when args are given while sys.argv has some: here they are export's own.
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended")
        cli = ModelOnlyCLI(MultilingualLM, MultilingualDataModule, args=config_args, run=False, adapter=adapter)
    return cli.model


def read_checkpoint(path: Path) -> tuple[dict[str, Tensor], Optional[list[str]]]:
    """The weights of a checkpoint (Lightning module names) and the names it lists under
    ``trainable_parameters`` (None for checkpoints from before that key)."""
    if path.is_dir() and (path / "meta.pt").is_file():
        return read_distributed_checkpoint(path)
    if path.is_dir():
        return read_deepspeed_checkpoint(path)
    checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ExportError(f"{path} is not a Lightning checkpoint (it has no state_dict): pass the .ckpt that fit wrote")
    return checkpoint["state_dict"], checkpoint.get(TRAINABLE)


def read_deepspeed_checkpoint(path: Path) -> tuple[dict[str, Tensor], Optional[list[str]]]:
    """``read_checkpoint`` of a DeepSpeed checkpoint directory: DeepSpeed's own consolidation of the
    fp32 weights (all ZeRO partitions; the frozen ones are absent when excluded at save)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if not (path / "latest").is_file():
        raise ExportError(f"{path} is a directory without a `latest` file, so not a DeepSpeed checkpoint: "
                          "pass the <name>.ckpt directory that fit wrote")
    return get_fp32_state_dict_from_zero_checkpoint(str(path)), saved_trainable(path)


def read_distributed_checkpoint(path: Path) -> tuple[dict[str, Tensor], Optional[list[str]]]:
    """``read_checkpoint`` of a PyTorch distributed checkpoint (what FSDP strategies save: a shard per
    rank plus Lightning's ``meta.pt``), consolidated by torch's own converter."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        whole = Path(tmp) / "checkpoint.pt"
        dcp_to_torch_save(str(path), str(whole))
        state = torch.load(whole, map_location="cpu", weights_only=False)["state_dict"]
    meta = torch.load(path / "meta.pt", map_location="cpu", weights_only=False)
    return state, meta.get(TRAINABLE)


def load_weights(module: MultilingualLM, state: dict[str, Tensor], trained: Optional[list[str]], path: Path) -> None:
    """Load ``state`` into ``module``, refusing a checkpoint of another model or adapter: a non-strict
    load (needed, since frozen weights are not in adapter checkpoints) would skip them silently."""
    fix = "export with the config (model and model.peft) the checkpoint was trained with"
    trainable = trainable_names(module)
    difference = trainable_difference(trained, module) if trained is not None else None
    if difference is not None:
        raise ExportError(f"{path} trained other parameters than this config's model trains {difference}: {fix}")
    unknown = sorted(set(state) - set(module.state_dict()))
    if unknown:
        raise ExportError(f"{path} holds {len(unknown)} parameters this config's model does not have "
                          f"(e.g. {unknown[:3]}): {fix}")
    missing = sorted(set(trainable) - set(state))
    if missing:
        raise ExportError(f"{path} lacks {len(missing)} of the parameters this config's model trains "
                          f"(e.g. {missing[:3]}): {fix}")
    try:
        module.load_state_dict(state, strict=False)
    except RuntimeError as error:  # e.g. another LoRA rank: same names, other shapes
        # torch lists every mismatch on a line of its own: the first, and how many there are.
        mismatches = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
        raise ExportError(f"{path} does not fit this config's model ({len(mismatches)} mismatches, the first: "
                          f"{mismatches[0] if mismatches else error}): {fix}") from None


def save_full(module: MultilingualLM, out: Path) -> str:
    """The model (an adapter merged into its base) and the tokenizer, with ``save_pretrained``.

    The merge is in place, not on a copy: the export is the module's last use, and a copy would
    double host memory (64 GB for an 8B model in fp32)."""
    model = module.model
    if module.hparams.peft is not None:
        if not hasattr(model.base_model, "merge_and_unload"):
            raise ExportError(f"a {model.peft_config['default'].peft_type} adapter cannot be merged into its base: "
                              "export it with --adapter")
        model = model.merge_and_unload()
    model.save_pretrained(out)
    module.tokenizer.save_pretrained(out)
    return "model" + (" (adapter merged into the base)" if module.hparams.peft is not None else "")


def base_model_name(hparams: Any) -> Optional[str]:
    """Where ``from_pretrained`` finds the frozen base again: the config's hub name, or its local
    directory made absolute; None when the base exists nowhere else (model_config, a GGUF file)."""
    if hparams.pretrained is None:
        return None
    path, gguf = _split_gguf(hparams.pretrained, hparams.gguf_file)
    if gguf is not None:
        return None
    return os.path.abspath(path) if os.path.isdir(path) else path


def save_adapter(module: MultilingualLM, out: Path) -> str:
    """The PEFT adapter and the tokenizer with ``save_pretrained``, and the base in ``out/base`` when
    no hub name or directory holds it."""
    model = module.model
    base = base_model_name(module.hparams)
    base_dir = out / "base" if base is None else None
    for config in model.peft_config.values():
        config.base_model_name_or_path = str(base_dir.resolve()) if base_dir is not None else base
    # "auto" would ask the Hub whether the base's embeddings were resized; fit never resizes them.
    model.save_pretrained(out, save_embedding_layers=False)
    module.tokenizer.save_pretrained(out)
    if base_dir is None:
        return f"adapter (its base: {base})"
    model.unload().save_pretrained(base_dir)  # unload: the base without the adapter, not merged
    return f"adapter and its base (in {base_dir.resolve()})"


@rank_zero_only
def report(what: str, path: Path, out: Path) -> None:
    Console().print(f"lightning-moo export: wrote the {what} and the tokenizer from {path} to {out.resolve()}",
                    soft_wrap=True)


def export(config_args: list[str], ckpt_path: str, out: str, adapter: bool = False) -> Path:
    """Build the model of a fit config, load a checkpoint into it and write it to ``out``."""
    path, out_dir = Path(ckpt_path), Path(out)
    if not path.exists():
        raise ExportError(f"--ckpt_path {path} does not exist: pass a checkpoint that fit wrote "
                          "(e.g. <run>/checkpoints/last.ckpt; the run summary prints its path)")
    # A directory holding both a full model and an adapter would load as the adapter.
    if out_dir.is_file() or (out_dir.is_dir() and any(out_dir.iterdir())):
        raise ExportError(f"--out {out_dir} exists and is not an empty directory: pass a new directory or remove it")
    module = build_module(config_args, adapter=adapter)
    state, trained = read_checkpoint(path)
    load_weights(module, state, trained, path)
    out_dir.mkdir(parents=True, exist_ok=True)
    what = save_adapter(module, out_dir) if adapter else save_full(module, out_dir)
    report(what, path, out_dir)
    return out_dir


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Export's own options, and the rest: config overrides, passed on as for ``fit``."""
    parser = argparse.ArgumentParser(prog="lightning-moo export", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", action="append", required=True, metavar="CONFIG.yaml",
                        help="the run's fit config (repeatable, as for fit)")
    parser.add_argument("--ckpt_path", required=True, metavar="CKPT",
                        help="the checkpoint: a DeepSpeed .ckpt directory or a single-file .ckpt")
    parser.add_argument("--out", required=True, metavar="DIR", help="the directory to write (new or empty)")
    parser.add_argument("--adapter", action="store_true", help="write the PEFT adapter alone (needs model.peft)")
    return parser.parse_known_args(argv)


def main(argv: list[str]) -> None:
    """``lightning-moo export ARGS``: exits with status 2 and a one-line error for what it refuses."""
    args, overrides = parse_args(argv)
    config_args = [f"--config={config}" for config in args.config] + overrides
    try:
        export(config_args, args.ckpt_path, args.out, adapter=args.adapter)
    except ExportError as error:
        print(f"lightning-moo export: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
