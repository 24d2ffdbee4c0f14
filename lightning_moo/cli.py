"""``lightning-moo``: LightningCLI for multilingual fine-tuning with bucket-level MOO.

    lightning-moo fit --config configs/demo.yaml
    lightning-moo fit --config configs/demo.yaml --strategy.solver=cagrad --strategy.solver.c=0.4
    lightning-moo validate --config configs/demo.yaml --ckpt_path <run>/checkpoints/last.ckpt
    lightning-moo export --config configs/demo.yaml --ckpt_path <run>/checkpoints/last.ckpt --out hf/

``export`` (``lightning_moo.export``) writes a checkpoint as a Hugging Face model directory;
``lm-eval-tasks`` (``lightning_moo.lm_eval_tasks``) writes lm-evaluation-harness tasks over local
SIB-200 files; the other subcommands are LightningCLI's.

The strategy is a top-level ``strategy:`` section (any Lightning ``Strategy``; default
``BucketMOOStrategy`` with MGDA), so that its solver is one flag away. Its ``languages`` default to
``data.train_languages``.

A solver is named by its registered short name (case-insensitive: ``mgda``, ``cagrad``, …; see
``lightning_moo.solvers.solver_names``), by class name or by ``class_path``, on the command line
and in YAML (``solver: mgda``, ``solver: {class_path: cagrad, init_args: {c: 0.4}}``). An unknown
name fails in two lines that list the solvers, before jsonargparse would print its usage dump.
"""

from __future__ import annotations

import json
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import get_loader, set_loader
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities import rank_zero_only
from rich.console import Console
from rich.table import Table

from . import _compat, faults
from . import solvers  # noqa: F401  (imported so that solver class names like CAGrad resolve)
from . import strategies  # noqa: F401  (and strategy short names)
from .callbacks.preemption import PREEMPTED_EXIT, Preemption
from .callbacks.progress import StepProgressBar
from .data import MultilingualDataModule
from .module import MultilingualLM
from .resume_checks import OVERRIDE, ResumeCheckError, check_resume
from .solvers import solver_class_path
from .tensorboard import output_dir

DEFAULT_STRATEGY = {"class_path": "lightning_moo.strategies.BucketMOOStrategy"}
DESCRIPTION = (
    "lightning-moo: multilingual fine-tuning with bucket-level MOO. Subcommands: fit, validate, test, "
    "predict (Lightning's); export: a checkpoint as a Hugging Face model directory or PEFT adapter "
    "(lightning-moo export --help); lm-eval-tasks: lm-evaluation-harness tasks over local SIB-200 files "
    "(lightning-moo lm-eval-tasks --help)."
)

# --- solvers by name: registered names become class paths before jsonargparse resolves them ----

# --strategy.solver, --strategy.init_args.solver, and their .class_path (and .help) sub-options.
SOLVER_OPTION = re.compile(r"--strategy(?:\.init_args)?\.solver(\.class_path|\.help)?")
# YAML with the solver names of every ``strategy:`` section resolved (config files, --strategy values).
PARSER_MODE = "lightning_moo_yaml"


class SolverNameError(SystemExit):
    """An unknown solver. A SystemExit (status 2), so that it passes through jsonargparse, which
    would turn any other error of its YAML loader into a usage dump; :class:`MOOCLI` prints it."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(2)
        self.message = f"lightning-moo: error: {where}: {message}"


def _solver_spec(spec: Any) -> Any:
    """A solver value (a name/path string or a ``{class_path, init_args}`` mapping), by path."""
    if isinstance(spec, str) and spec.strip() not in ("", "null", "None", "~"):
        return solver_class_path(spec.strip())
    if isinstance(spec, dict) and isinstance(spec.get("class_path"), str):
        return {**spec, "class_path": solver_class_path(spec["class_path"])}
    return spec


def _resolve_strategy_spec(spec: Any, where: str) -> None:
    """Resolve, in place, the solver of a strategy spec: ``solver`` or ``init_args.solver``."""
    for holder in (spec, spec.get("init_args")) if isinstance(spec, dict) else ():
        if isinstance(holder, dict) and "solver" in holder:
            try:
                holder["solver"] = _solver_spec(holder["solver"])
            except ValueError as error:
                raise SolverNameError(where, str(error)) from None


def resolve_solver_names_in_config(config: Any) -> Any:
    """Resolve, in place, the solver of every ``strategy:`` section of a loaded config (at the top
    or under a subcommand); raises SolverNameError for an unknown name."""
    if isinstance(config, dict):
        for key, value in config.items():
            if key == "strategy":
                _resolve_strategy_spec(value, "strategy.solver (in a config)")
            elif isinstance(value, dict):
                resolve_solver_names_in_config(value)
    return config


def resolve_solver_names_in_args(args: list[str]) -> list[str]:
    """The command line with solver names (``--strategy.solver=cagrad``, ``--strategy.solver X``,
    ``--strategy.solver.class_path X``, ``--strategy.solver '{class_path: x}'``, ``--strategy
    '{…, init_args: {solver: x}}'``) as class paths; raises SolverNameError for an unknown name."""
    args = list(args)
    for i, arg in enumerate(args):
        option, eq, value = arg.partition("=")
        match = SOLVER_OPTION.fullmatch(option)
        has_value = eq or (i + 1 < len(args) and not args[i + 1].startswith("--"))
        if (match is None and option != "--strategy") or not has_value:
            continue
        value = value if eq else args[i + 1]
        try:
            if match is None:  # --strategy: a class path, a file, or an inline spec with a solver
                if not value.lstrip().startswith("{"):
                    continue
                spec = yaml.safe_load(value)
                _resolve_strategy_spec(spec, option)
                resolved = json.dumps(spec)
            elif match.group(1):  # .class_path / .help: a class name or path
                resolved = solver_class_path(value)
            elif value.lstrip().startswith("{"):
                resolved = json.dumps(_solver_spec(yaml.safe_load(value)))
            else:
                resolved = _solver_spec(value)
        except ValueError as error:
            raise SolverNameError(option, str(error)) from None
        if eq:
            args[i] = f"{option}={resolved}"
        else:
            args[i + 1] = resolved
    return args


def _load_yaml_resolving_solver_names(text: str) -> Any:
    return resolve_solver_names_in_config(get_loader("yaml")(text))


set_loader(PARSER_MODE, _load_yaml_resolving_solver_names, (yaml.YAMLError,))


class PredictionWriter(BasePredictionWriter):
    """Every rank writes its predictions (its shard of each language) as JSON lines."""

    def __init__(self, output_dir: str) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = Path(output_dir)

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        # One list of batches per dataloader (language) when there are several, else one list.
        loaders = predictions if len(trainer.num_predict_batches) > 1 else [predictions]
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / f"predictions_rank{trainer.global_rank}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for batches in loaders:
                for rows in batches:
                    for row in rows:
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")


class MOOCLI(LightningCLI):
    def init_parser(self, **kwargs: Any):
        kwargs.setdefault("parser_mode", PARSER_MODE)  # YAML, solver names resolved
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser, args) -> None:
        # Solver names become class paths (or a two-line error) before jsonargparse sees them.
        try:
            if args is None:  # the real command line
                self.config = parser.parse_args(resolve_solver_names_in_args(sys.argv[1:]))
                return
            if isinstance(args, (list, tuple)):
                args = resolve_solver_names_in_args(args)
            super().parse_arguments(parser, args)
        except SolverNameError as error:
            print(error.message, file=sys.stderr)
            raise

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_subclass_arguments(Strategy, "strategy", required=False, fail_untyped=False)
        parser.set_defaults({"strategy": DEFAULT_STRATEGY})
        parser.add_argument(
            f"--{OVERRIDE}", type=bool, default=False,
            help="fit --ckpt_path: resume although data.train_languages differs from the checkpoint's (refused otherwise)",
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        strategy = config.get("strategy")
        init_args = getattr(strategy, "init_args", None)
        if init_args is not None and "languages" in init_args and init_args.languages is None:
            init_args.languages = list(config.data.train_languages)
        # A damaged or mismatched checkpoint fails here in a second, not after the model is built and
        # DeepSpeed initialised (lightning_moo.resume_checks says what is checked).
        if config.get("ckpt_path") is not None:
            try:
                check_resume(config.ckpt_path, config, self.subcommand)
            except ResumeCheckError as error:
                print(error.message, file=sys.stderr)
                raise

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        if config.get("strategy") is not None:
            kwargs["strategy"] = config["strategy"]
        # Every run survives preemption and reports a failed rank by name, unless the config brings its own.
        callbacks = list(config["trainer"].get("callbacks") or [])
        for default in (Preemption, faults.Heartbeat):
            if not any(isinstance(c, default) for c in callbacks):
                callbacks.append(default())
        if config["trainer"].get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(StepProgressBar())  # steps of max_steps, not batches of the epoch
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)

    def before_predict(self) -> None:
        # Predictions go to files next to the run's logs; the summary says where.
        self.trainer.callbacks.append(PredictionWriter(prediction_dir(self.trainer)))

    def after_predict(self) -> None:
        summarize(self.trainer, "predict")

    def after_fit(self) -> None:
        summarize(self.trainer, "fit")
        preemption = next((c for c in self.trainer.callbacks if isinstance(c, Preemption)), None)
        if preemption is not None and preemption.preempted:
            say_preempted(self.trainer, preemption)
            faults.wait_for_children()
            sys.exit(faults.exit_status_when_preempted(PREEMPTED_EXIT))

    def after_validate(self) -> None:
        summarize(self.trainer, "validate")

    def after_test(self) -> None:
        summarize(self.trainer, "test")


@rank_zero_only
def say_preempted(trainer: Trainer, preemption: Preemption) -> None:
    Console().print(
        f"lightning-moo: preempted: stopped after step {preemption.step} with a checkpoint of it, "
        f"{preemption.checkpoint.resolve()}; resume with --ckpt_path {preemption.checkpoint} "
        f"(or --ckpt_path last); exit status {PREEMPTED_EXIT}", soft_wrap=True)


def prediction_dir(trainer: Trainer) -> Path:
    return output_dir(trainer) / "predictions"


@rank_zero_only
def summarize(trainer: Trainer, stage: str) -> None:
    """Where the run wrote its logs and checkpoints, and its last per-language metrics."""
    console = Console()
    console.rule("lightning-moo: run summary")
    # Not trainer.log_dir: it broadcasts, a collective that rank zero must not enter alone.
    log_dir = output_dir(trainer)
    console.print(f"logs (tensorboard --logdir {log_dir.parent}): {log_dir.resolve()}", soft_wrap=True)
    checkpoint = trainer.checkpoint_callback
    last = getattr(checkpoint, "last_model_path", "") if checkpoint is not None else ""
    if last:
        console.print(f"last checkpoint: {Path(last).resolve()}", soft_wrap=True)
    best = getattr(checkpoint, "best_model_path", "") if checkpoint is not None else ""
    # Without a monitored metric "best" is only the newest top-k checkpoint, and after a resume it may
    # still be one of the previous run's: shown when it is this run's folder and says something new.
    here = bool(best) and bool(checkpoint.dirpath) and Path(best).resolve().parent == Path(checkpoint.dirpath).resolve()
    if here and best != last and (checkpoint.monitor or not last):
        label = f"best checkpoint (by {checkpoint.monitor})" if checkpoint.monitor else "newest checkpoint"
        console.print(f"{label}: {Path(best).resolve()}", soft_wrap=True)
    if stage == "fit":
        console.print(f"global step: {trainer.global_step}")
    if stage == "predict":
        console.print(f"predictions (one JSON line per example, per rank): {prediction_dir(trainer).resolve()}", soft_wrap=True)
    table = Table("metric", "value")
    for name, value in sorted(trainer.callback_metrics.items()):
        if name.startswith(("val/", "test/", "train/loss")):
            table.add_row(name, f"{float(value):.4f}")
    if table.rows:
        console.print(table)


# Messages that are expected here and would otherwise repeat once per rank and step.
QUIET = (
    r".*no pre-optimization state was saved",  # manual optimization: checkpoints after the step are what we resume from
    r".*when logging on epoch level in distributed setting",  # evaluation metrics are already summed over ranks
    r".*`isinstance\(treespec, LeafSpec\)` is deprecated",
    r".*all_gather.* is deprecated",
)


def main(args: Any = None) -> None:
    for message in QUIET:
        warnings.filterwarnings("ignore", message=message)
    faults.CONTEXT = None  # a run's context is its own (tests run several in one process)
    if os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) != "0":
        # Printed by every rank on a resume; rank zero's copy says it.
        warnings.filterwarnings("ignore", message=".*dirpath has changed")
    argv = sys.argv[1:] if args is None else args
    # export is not a Trainer method: it is dispatched before LightningCLI parses the command line.
    if isinstance(argv, (list, tuple)) and list(argv[:1]) == ["export"]:
        from .export import main as export_main

        export_main(list(argv[1:]))
        return
    if isinstance(argv, (list, tuple)) and list(argv[:1]) == ["lm-eval-tasks"]:
        from .lm_eval_tasks import main as tasks_main

        tasks_main(list(argv[1:]))
        return
    # A failed, killed or silent rank is reported by name, once (lightning_moo.faults).
    marked = faults.mark_launcher()
    _compat.report_failed_ranks(faults.watch_children)
    faults.SUMMARIZE = lambda trainer: summarize(trainer, "fit")
    try:
        MOOCLI(
            MultilingualLM,
            MultilingualDataModule,
            # Each rank reads its own language; Lightning must not re-shard the samplers.
            trainer_defaults={"use_distributed_sampler": False},
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"description": DESCRIPTION},
            args=args,
        )
    except Exception as error:
        faults.fail(error)
    finally:
        if marked:
            faults.unmark_launcher()
    faults.wait_for_children()


if __name__ == "__main__":
    main()
