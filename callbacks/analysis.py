"""The scaffolding shared by the text-analysis callbacks (silhouette, LAPE neurons): the texts,
tokenizer and model found at setup, the run points, rank-zero-only evaluation, progress bars."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_moo.data.parallel import load_texts

from lightning_moo.hf import find_causal_lm, resolve_tokenizer

RUN_POINTS = ("fit_start", "validation_end", "fit_end")


def progress(total: int, description: str, enabled: bool):
    """A progress bar over the analysis batches (tqdm, which Lightning already depends on)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, disable=not enabled, leave=False, dynamic_ncols=True)


def batch_count(texts: Mapping[str, Sequence[str]], batch_size: int) -> int:
    return sum(-(-len(sentences) // batch_size) for sentences in texts.values())


def shards_parameters(strategy) -> bool:
    """Whether each rank holds only a partition of the weights (ZeRO-3, FSDP)."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    return bool(getattr(strategy, "zero_stage_3", False)) or isinstance(strategy, (FSDPStrategy, ModelParallelStrategy))


def check_run_points(run_at: Sequence[str]) -> tuple[str, ...]:
    unknown = [point for point in run_at if point not in RUN_POINTS]
    if unknown:
        raise ValueError(f"unknown run_at entries {unknown}; choose from {RUN_POINTS}")
    return tuple(run_at)


class TextAnalysisCallback(Callback):
    """Shared scaffolding of the analysis callbacks: texts, tokenizer and model found at setup (so
    that bad input fails before training), runs at the chosen points, on global rank zero only, in
    eval mode without gradients, restoring the model's mode afterwards. Subclasses implement
    :meth:`measure`."""

    def __init__(
        self,
        texts: Mapping[str, Sequence[str]] | str | os.PathLike,
        tokenizer=None,
        languages: Sequence[str] | None = None,
        split: str = "dev",
        max_sentences: int | None = 100,
        batch_size: int = 8,
        max_length: int = 128,
        run_at: Sequence[str] = ("fit_start",),
    ):
        self.texts_source, self.tokenizer_source = texts, tokenizer
        self.languages, self.split, self.max_sentences = languages, split, max_sentences
        self.batch_size, self.max_length = batch_size, max_length
        self.run_at = check_run_points(run_at)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if shards_parameters(trainer.strategy):
            # Rank zero would run the model alone, and a ZeRO-3 or FSDP forward gathers every weight
            # from all ranks: it would wait forever.
            raise RuntimeError(
                f"{type(self).__name__} measures on global rank zero alone, which under "
                f"{type(trainer.strategy).__name__} (ZeRO-3 or FSDP) holds only a partition of each weight. "
                "Leave it out of such runs, or train with ZeRO-1/2 or DDP."
            )
        self.model = find_causal_lm(pl_module)
        self.tokenizer = resolve_tokenizer(self.tokenizer_source, pl_module)
        self.texts = load_texts(self.texts_source, self.languages, self.split, self.max_sentences)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if "fit_start" in self.run_at:
            self.analyse(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if "validation_end" in self.run_at and not trainer.sanity_checking:
            self.analyse(trainer)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if "fit_end" in self.run_at:
            self.analyse(trainer)

    def analyse(self, trainer: Trainer):
        # Every rank holds the full model under ZeRO-1/2, so rank zero alone measures and logs.
        if not trainer.is_global_zero:
            return None
        was_training = self.model.training
        self.model.eval()
        try:
            return self.measure(trainer)
        finally:
            self.model.train(was_training)

    def measure(self, trainer: Trainer):
        """Compute on ``self.texts`` with ``self.model`` (in eval mode), log, and return the result."""
        raise NotImplementedError
