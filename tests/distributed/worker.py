"""One rank of a multi-process test: runs a list of training runs and saves what they produced.

Usage: ``python worker.py SCENARIO.json`` with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* set by
:func:`launch.run_ranks`. Each run trains :class:`toy.ToyModule` on language RANK and writes
``{name}_rank{RANK}.pt`` (final parameters, per-step snapshots, per-step bucket records, error).
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import sys
import traceback

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from toy import ToyModule, named_params

from lightning_moo.callbacks import ConflictMonitor
from lightning_moo.strategies import BucketMOOStrategy, StockDeepSpeedStrategy


class Recorder(pl.Callback):
    """Parameters before every optimizer step (and at the end), and the buckets each step solved."""

    def __init__(self, accumulate: int) -> None:
        self.accumulate, self.snapshots, self.buckets = accumulate, [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx % self.accumulate == 0:
            self.snapshots.append(gathered_params(trainer, module))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if (batch_idx + 1) % self.accumulate == 0 and isinstance(trainer.strategy, BucketMOOStrategy):
            self.buckets.append(copy.deepcopy(trainer.strategy.buckets))


def gathered_params(trainer, module) -> dict[str, torch.Tensor]:
    """The module's parameters; ZeRO-3 keeps only a partition on each rank, so gather them first."""
    if not getattr(trainer.strategy, "zero_stage_3", False):
        return named_params(module.net)
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.net.parameters())):
        return named_params(module.net)


class NaNLoss(ToyModule):
    def __init__(self, *args, nan_at, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.nan_at = nan_at

    def training_step(self, data, batch_idx):
        loss = super().training_step(data, batch_idx)
        if [self.language, self.trainer.global_step] == self.nan_at:
            loss = loss * float("nan")
        return loss


def make_solver(spec):
    module, _, name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))


def make_strategy(spec: dict):
    args = dict(
        stage=spec.get("stage", 2),
        **({"reduce_scatter": spec["reduce_scatter"]} if "reduce_scatter" in spec else {}),
        overlap_comm=spec.get("overlap_comm", True),
        contiguous_gradients=spec.get("contiguous_gradients", True),
        reduce_bucket_size=spec.get("reduce_bucket_size", 200_000_000),
        logging_batch_size_per_gpu=1,
    )
    if "config" in spec:
        args = dict(config=spec["config"])
    if spec.get("strategy", "moo") == "stock":
        return StockDeepSpeedStrategy(**args)
    return BucketMOOStrategy(
        solver=make_solver(spec["solver"]),
        exchange=spec.get("exchange", "sharded"),
        mode=spec.get("mode", "bucket"),
        languages=spec.get("languages"),
        stash_device=spec.get("stash_device"),
        target_buckets=spec.get("target_buckets"),
        on_device=spec.get("on_device"),
        **args,
    )


def run(spec: dict, rank: int, world: int, out: str) -> bool:
    accumulate, steps = spec.get("accumulate", 1), spec.get("steps", 3)
    kwargs = dict(optimizer=spec.get("optimizer", "sgd"), lr=spec.get("lr", 0.1), lora=spec.get("lora", False))
    # "ranks_per_language" k: ranks t·k … t·k + k - 1 train language t on different batches.
    # "languages_per_rank" m: rank r trains languages r·m … r·m + m - 1.
    k, m = spec.get("ranks_per_language", 1), spec.get("languages_per_rank", 1)
    kwargs["replica"] = rank % k
    language = rank // k if m == 1 else list(range(rank * m, rank * m + m))
    module = NaNLoss(language, nan_at=spec["nan_at"], **kwargs) if "nan_at" in spec else ToyModule(language, **kwargs)
    recorder = Recorder(accumulate)
    data = DataLoader(range(steps * accumulate), batch_size=None)
    # "monitor": ConflictMonitor arguments; its TensorBoard events go to OUT/<name>/.
    monitor = [ConflictMonitor(**spec["monitor"])] if "monitor" in spec else []
    logger = TensorBoardLogger(os.path.join(out, spec["name"]), name="", version="") if "monitor" in spec else False

    def trainer(max_steps: int) -> pl.Trainer:
        return pl.Trainer(
            accelerator="cpu",
            devices=world,
            precision=spec.get("precision", "32-true"),
            strategy=make_strategy(spec),
            max_steps=max_steps,
            accumulate_grad_batches=accumulate,
            gradient_clip_val=spec.get("clip"),
            callbacks=[recorder, *monitor],
            logger=logger,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            use_distributed_sampler=False,
        )

    error = None
    try:
        if "resume_at" in spec:
            # Train part of the way and checkpoint; continue in a fresh module and strategy.
            first = trainer(spec["resume_at"])
            first.fit(module, data)
            path = os.path.join(out, f"{spec['name']}.ckpt")
            first.save_checkpoint(path)
            module = ToyModule(language, **kwargs)
            trainer(steps).fit(module, data, ckpt_path=path)
        else:
            trainer(steps).fit(module, data)
    except Exception as exc:  # the test asserts on the message; a crash must not hang the peer
        error = f"{type(exc).__name__}: {exc}"
        if not spec.get("expect_error"):
            traceback.print_exc()
    result = dict(params=named_params(module.net), snapshots=recorder.snapshots, buckets=recorder.buckets, error=error)
    torch.save(result, os.path.join(out, f"{spec['name']}_rank{rank}.pt"))
    return error is None or bool(spec.get("expect_error"))


def main() -> None:
    with open(sys.argv[1]) as f:
        scenario = json.load(f)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.use_deterministic_algorithms(True)
    ok = [run(spec, rank, world, scenario["out"]) for spec in scenario["runs"]]
    shutdown()
    sys.exit(0 if all(ok) else 1)


def shutdown() -> None:
    """Leave together: a rank whose peer already exited can abort in gloo's teardown."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
