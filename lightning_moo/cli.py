"""``lightning-moo``: LightningCLI for multilingual fine-tuning with bucket-level MOO.

    lightning-moo fit --config configs/demo.yaml
    lightning-moo fit --config configs/demo.yaml --strategy.solver=CAGrad --strategy.solver.c=0.4
    lightning-moo validate --config configs/demo.yaml --ckpt_path <run>/checkpoints/last.ckpt

The strategy is a top-level ``strategy:`` section (any Lightning ``Strategy``; default
``BucketMOOStrategy`` with MGDA), so that its solver is one flag away. Its ``languages`` default to
``data.train_languages``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities import rank_zero_only
from rich.console import Console
from rich.table import Table

from . import solvers  # noqa: F401  (imported so that solver short names like CAGrad resolve)
from . import strategies  # noqa: F401  (and strategy short names)
from .data import MultilingualDataModule
from .module import MultilingualLM

DEFAULT_STRATEGY = {"class_path": "lightning_moo.strategies.BucketMOOStrategy"}


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
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_subclass_arguments(Strategy, "strategy", required=False, fail_untyped=False)
        parser.set_defaults({"strategy": DEFAULT_STRATEGY})

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        strategy = config.get("strategy")
        init_args = getattr(strategy, "init_args", None)
        if init_args is not None and "languages" in init_args and init_args.languages is None:
            init_args.languages = list(config.data.train_languages)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        if config.get("strategy") is not None:
            kwargs["strategy"] = config["strategy"]
        return super().instantiate_trainer(**kwargs)

    def before_predict(self) -> None:
        # Predictions go to files next to the run's logs; the summary says where.
        self.trainer.callbacks.append(PredictionWriter(prediction_dir(self.trainer)))

    def after_predict(self) -> None:
        summarize(self.trainer, "predict")

    def after_fit(self) -> None:
        summarize(self.trainer, "fit")

    def after_validate(self) -> None:
        summarize(self.trainer, "validate")

    def after_test(self) -> None:
        summarize(self.trainer, "test")


def prediction_dir(trainer: Trainer) -> Path:
    return Path(getattr(trainer.logger, "log_dir", None) or trainer.default_root_dir) / "predictions"


@rank_zero_only
def summarize(trainer: Trainer, stage: str) -> None:
    """Where the run wrote its logs and checkpoints, and its last per-language metrics."""
    console = Console()
    console.rule("lightning-moo: run summary")
    # trainer.log_dir would broadcast, a collective that rank zero must not enter alone.
    log_dir = getattr(trainer.logger, "log_dir", None) or trainer.default_root_dir
    console.print(f"logs (tensorboard --logdir {Path(log_dir).parent}): {Path(log_dir).resolve()}", soft_wrap=True)
    checkpoint = trainer.checkpoint_callback
    for kind in ("last", "best"):
        path = getattr(checkpoint, f"{kind}_model_path", "") if checkpoint is not None else ""
        if path:
            console.print(f"{kind} checkpoint: {Path(path).resolve()}", soft_wrap=True)
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
    MOOCLI(
        MultilingualLM,
        MultilingualDataModule,
        # Each rank reads its own language; Lightning must not re-shard the samplers.
        trainer_defaults={"use_distributed_sampler": False},
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
