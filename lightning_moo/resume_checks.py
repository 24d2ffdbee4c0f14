"""Checks of ``--ckpt_path`` that run before anything heavy is built (model, data, DeepSpeed).

Without them a damaged or mismatched checkpoint is found only once the model is built and DeepSpeed
initialised, with DeepSpeed's or pickle's error (a bare ``AssertionError``, ``EOFError``, "checkpoint
file is corrupted" without a file name), or not at all (another language list resumes silently).
Here only the checkpoint's small files are read, and its torch files memory-mapped: their tensors are
not read, so this costs about a second even for an 8B model's checkpoint.

``MOOCLI.before_instantiate_classes`` calls :func:`check_resume`. A refusal is a
:class:`ResumeCheckError` (exit status 2) whose message names the file or setting and the fix;
a changed schedule setting or solver is a one-line warning.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only

# The key of the record that MultilingualLM.on_save_checkpoint writes (see run_record).
RUN = "run"
LATEST = "latest"  # DeepSpeed's file naming the tag directory; it writes it after the tag's files
MODEL_STATES = "mp_rank_00_model_states.pt"
STAGE3_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"  # ZeRO-3 writes one per rank instead
OPTIM_SHARD = "zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
OVERRIDE = "resume_with_other_languages"


class ResumeCheckError(SystemExit):
    """A checkpoint that cannot be resumed as asked. A SystemExit (status 2) like the CLI's
    SolverNameError: MOOCLI prints the message, with no traceback."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = f"lightning-moo: error: {message}"


def run_record(trainer: Any, hparams: Any) -> dict[str, Any]:
    """What a resume compares with its own config: written into every checkpoint."""
    data = getattr(trainer, "datamodule", None)
    languages = getattr(data, "train_languages", None)
    solver = getattr(trainer.strategy, "solver", None)
    return {
        "train_languages": list(languages) if languages is not None else None,
        "world_size": trainer.world_size,
        "solver": _qualified(type(solver)) if solver is not None else None,
        "max_steps": trainer.max_steps,
        "schedule": hparams.get("schedule"),
        "lr": hparams.get("lr"),
        "warmup_steps": hparams.get("warmup_steps"),
    }


def check_resume(ckpt_path: Any, config: Any, subcommand: Optional[str]) -> None:
    """Refuse (ResumeCheckError) a checkpoint that is missing, incomplete or unreadable, and for
    ``fit`` one saved with another world size or language list; warn about changed settings."""
    text = str(ckpt_path)
    # Lightning resolves these itself once the Trainer and its callbacks exist ("last": the newest
    # checkpoint of the ModelCheckpoint dirpath, "hpc": the SLURM requeue checkpoint, "registry":
    # a model registry download); remote URLs go through fsspec. Nothing cheap to check here.
    if text in ("last", "best", "hpc") or text.startswith("registry") or "://" in text:
        return
    path = Path(text)
    fitting = subcommand == "fit"
    states = check_complete(path, fitting)
    if not fitting:
        return  # validate/test/predict load the weights only: any world size or language list will do
    saved = saved_run(states)
    check_world_size(saved.get("world_size"), config)
    check_languages(saved.get("train_languages"), config)
    for line in changed_settings(saved, config):
        warn(line)


# ----------------------------------------------------------------------------------- completeness
def check_complete(path: Path, fitting: bool) -> dict[str, Any]:
    """The checkpoint's model states (or the single file's dict), memory-mapped, once every file a
    resume reads is there and loads: for DeepSpeed also ``latest``, the tag directory and (for fit)
    one optimizer shard per data-parallel rank."""
    if not path.exists():
        raise ResumeCheckError(
            f"--ckpt_path {path} does not exist.\nFix: pass an existing checkpoint. {_other_checkpoints(path)}"
        )
    if path.is_file():
        return _load(path, "the checkpoint", path)
    latest = path / LATEST
    if not latest.is_file():
        inside = _checkpoints_in(path)
        if inside:  # the checkpoints folder itself, not one checkpoint in it
            raise ResumeCheckError(
                f"--ckpt_path {path} is a folder of checkpoints.\nFix: pass one of them: {', '.join(inside)}."
            )
        tags = [d.name for d in path.iterdir() if (d / MODEL_STATES).is_file() or (d / STAGE3_MODEL_STATES).is_file()]
        fix = f" If {path / tags[0]} is complete, name it: echo {tags[0]} > {latest}." if len(tags) == 1 else ""
        raise ResumeCheckError(
            f"{latest} is missing: not a complete DeepSpeed checkpoint (DeepSpeed writes it last: the save was "
            f"probably interrupted).\nFix: resume from another checkpoint. {_other_checkpoints(path)}{fix}"
        )
    tag = latest.read_text().strip()
    folder = path / tag
    if not folder.is_dir():
        raise ResumeCheckError(
            f"{latest} names the tag {tag!r}, but {folder} does not exist.\nFix: resume from another checkpoint. "
            f"{_other_checkpoints(path)}"
        )
    states_file = folder / MODEL_STATES
    if not states_file.is_file() and (folder / STAGE3_MODEL_STATES).is_file():
        states_file = folder / STAGE3_MODEL_STATES
    states = _load(states_file, "the model states", path)
    if fitting:
        # DeepSpeed reads every rank's optimizer shard, whatever the new world size.
        for rank in range(int(states.get("dp_world_size") or 0)):
            name = OPTIM_SHARD.format(rank=rank)
            # bf16 optimizers prefix the name (bf16_zero_pp_rank_...).
            shard = next(iter(sorted(folder.glob(f"*{name}"))), folder / name)
            _load(shard, f"the optimizer shard of rank {rank} of {states['dp_world_size']}", path)
    return states


def _load(file: Path, what: str, checkpoint: Path) -> dict[str, Any]:
    """``file`` memory-mapped (its tensors are not read); a ResumeCheckError naming it if it cannot be."""
    damaged = (
        f"the checkpoint is incomplete or damaged.\nFix: resume from another checkpoint. {_other_checkpoints(checkpoint)}"
    )
    if not file.is_file():
        raise ResumeCheckError(f"{file} is missing ({what}): {damaged}")
    if file.stat().st_size == 0:
        raise ResumeCheckError(f"{file} is empty ({what}, 0 bytes): {damaged}")
    with file.open("rb") as f:
        if f.read(1) == b"\x80":
            # The pre-1.6 pickle format (not a zip): mmap cannot read it, and reading it whole could
            # take minutes for a large model. Neither Lightning nor DeepSpeed write it today.
            return {}
    try:
        loaded = torch.load(file, map_location="cpu", mmap=True, weights_only=False)
    except Exception as error:  # zip/pickle errors of a truncated or overwritten file, of any type
        # The first sentence: torch's zip reader goes on about filing a bug report.
        reason = str(error).split(". ")[0].splitlines()[0][:160] if str(error).strip() else type(error).__name__
        raise ResumeCheckError(f"{file} cannot be read ({what}: {reason}): {damaged}") from None
    return loaded if isinstance(loaded, dict) else {}


def _checkpoints_in(folder: Path) -> list[str]:
    """Names of the checkpoints in ``folder``: ``.ckpt`` files and DeepSpeed checkpoint directories."""
    if not folder.is_dir():
        return []
    # Not the ".partial" ones: saves in progress or killed (lightning_moo/strategies/atomic.py).
    found = [p.name for p in folder.iterdir() if p.suffix == ".ckpt" or (p / LATEST).is_file()]
    return sorted(name for name in found if not name.endswith(".partial"))


def _other_checkpoints(path: Path) -> str:
    others = [name for name in _checkpoints_in(path.parent) if name != path.name]
    if others:
        return f"Checkpoints in {path.parent}: {', '.join(others)}."
    if path.parent.is_dir():
        return f"There is no other checkpoint in {path.parent}."
    return f"The folder {path.parent} does not exist either."


# ------------------------------------------------------------------------- the run's own settings
def saved_run(states: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's run record; for checkpoints written before it existed, what else tells."""
    record = states.get(RUN)
    if isinstance(record, dict):
        return record
    hparams = states.get("hyper_parameters") or {}
    return {
        "world_size": states.get("dp_world_size"),  # DeepSpeed's; a single file does not say
        "lr": hparams.get("lr"),
        "schedule": hparams.get("schedule"),
        "warmup_steps": hparams.get("warmup_steps"),
    }


def _get(config: Any, key: str) -> Any:
    """``config.<key>`` (dotted) of a jsonargparse Namespace, or None where it has no such key."""
    for part in key.split("."):
        config = config.get(part) if hasattr(config, "get") else getattr(config, part, None)
        if config is None:
            return None
    return config


def _count(value: Any) -> Optional[int]:
    """A number of devices or nodes, where the config says it plainly (not "auto" or -1)."""
    if isinstance(value, (list, tuple)):
        return len(value)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def check_world_size(saved: Optional[int], config: Any) -> None:
    devices, nodes = _count(_get(config, "trainer.devices")), _count(_get(config, "trainer.num_nodes") or 1)
    if saved is None or devices is None or nodes is None or devices * nodes == saved:
        return
    raise ResumeCheckError(
        f"the checkpoint was saved by {saved} processes, this run has {devices * nodes} (trainer.devices={devices} "
        f"x trainer.num_nodes={nodes}): its optimizer shards and each rank's languages and data position are laid "
        f"out for {saved}.\nFix: resume with trainer.devices x trainer.num_nodes = {saved}, or start a new run "
        "from its weights (lightning-moo export, then model.pretrained)."
    )


def check_languages(saved: Optional[list[str]], config: Any) -> None:
    now = _get(config, "data.train_languages")
    if saved is None or now is None or list(now) == list(saved):
        return
    change = f"the checkpoint trained data.train_languages [{', '.join(saved)}], this run [{', '.join(now)}]"
    if _get(config, OVERRIDE):
        warn(f"{change}: resuming with the new list, as --{OVERRIDE} asks")
        return
    raise ResumeCheckError(
        f"{change} (their order decides which rank trains which language).\nFix: resume with the checkpoint's "
        f"list, in its order, or pass --{OVERRIDE} true to continue its weights on the new one."
    )


def changed_settings(saved: dict[str, Any], config: Any) -> list[str]:
    """One line per setting that differs from the checkpoint's run, with what that changes."""
    schedule = _get(config, "model.schedule")
    # How each change shows: the learning-rate schedule is rebuilt from the config, but Lightning
    # restores the scheduler's state, whose base learning rate is the checkpoint's.
    effects = {
        "strategy.solver": ("solver", config_solver(config), "the new solver weighs the languages from here on"),
        "trainer.max_steps": ("max_steps", _get(config, "trainer.max_steps"),
                              f"the {schedule} learning-rate schedule is stretched to the new length from here on"),
        "model.schedule": ("schedule", schedule, "the learning rate follows the new schedule from here on"),
        "model.warmup_steps": ("warmup_steps", _get(config, "model.warmup_steps"),
                               "the learning-rate schedule is recomputed with the new warmup"),
        "model.lr": ("lr", _get(config, "model.lr"),
                     "no effect: the restored scheduler keeps the checkpoint's base learning rate"),
    }
    lines = []
    for setting, (key, now, effect) in effects.items():
        old = saved.get(key)
        if old is not None and now is not None and old != now:
            lines.append(f"{setting} was {old} in the checkpoint's run, is {now} now: {effect}")
    return lines


def config_solver(config: Any) -> Optional[str]:
    """The class of the solver the config asks for, as run_record writes it; None without a solver."""
    init_args = _get(config, "strategy.init_args")
    if init_args is None or "solver" not in init_args:
        return None
    spec = init_args["solver"]
    if spec is None:
        from .solvers import resolve_solver

        return _qualified(type(resolve_solver(None)))  # the strategies' default
    path = spec if isinstance(spec, str) else getattr(spec, "class_path", None)
    if not isinstance(path, str):
        return _qualified(type(spec))
    module, _, name = path.rpartition(".")
    try:
        return _qualified(getattr(importlib.import_module(module), name))
    except (ImportError, AttributeError, ValueError):
        return path


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def warn(line: str) -> None:
    # Every process of a run parses the config (Lightning's launcher starts the other ranks later
    # from the same command line): only rank zero prints.
    if rank_zero_only.rank == 0:
        print(f"lightning-moo: warning: {line}", file=sys.stderr, flush=True)
