"""Helpers shared by the analysis callbacks: the Hugging Face model inside a LightningModule, its
tokenizer, parallel per-language texts (SIB-200 layout), batching, and where to log."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from transformers import AutoTokenizer, PreTrainedModel

TSV_COLUMNS = ("index_id", "category", "text")
RUN_POINTS = ("fit_start", "validation_end", "fit_end")


def find_causal_lm(pl_module: LightningModule) -> PreTrainedModel:
    """The Hugging Face model the LightningModule wraps: its ``model`` attribute when that is a
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


def resolve_tokenizer(tokenizer, pl_module: LightningModule):
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


def _read_sib_tsv(path: Path) -> dict[str, tuple[int, str]]:
    """index_id -> (line number, text) of one SIB-200 style file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last row, it does not start a new one
    if not lines:
        raise ValueError(f"{path}: file is empty, expected a header {'<TAB>'.join(TSV_COLUMNS)}")
    header = tuple(lines[0].rstrip("\r").split("\t"))
    if header != TSV_COLUMNS:
        raise ValueError(
            f"{path}:1: header is {'<TAB>'.join(header)!r}, expected {'<TAB>'.join(TSV_COLUMNS)!r}"
        )
    rows: dict[str, tuple[int, str]] = {}
    for number, line in enumerate(lines[1:], start=2):
        fields = line.rstrip("\r").split("\t")
        if len(fields) != len(TSV_COLUMNS):
            raise ValueError(
                f"{path}:{number}: expected {len(TSV_COLUMNS)} tab-separated fields "
                f"({', '.join(TSV_COLUMNS)}), found {len(fields)}"
            )
        index_id, _, text = fields
        if index_id in rows:
            raise ValueError(f"{path}:{number}: index_id {index_id} repeats line {rows[index_id][0]}")
        rows[index_id] = (number, text)
    if not rows:
        raise ValueError(f"{path}: header only, no rows")
    return rows


def read_parallel_texts(
    directory: str | os.PathLike,
    languages: Sequence[str] | None = None,
    split: str = "dev",
    max_sentences: int | None = None,
) -> dict[str, list[str]]:
    """Parallel sentences from ``<directory>/<lang>/<split>.tsv`` (columns index_id, category, text).

    Every language must hold the same index_ids; the result lists sentences in the first language's
    order, so position k is the same sentence in every language. ``languages`` defaults to every
    subdirectory that has the split, in sorted order.
    """
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"text directory {root} does not exist")
    if languages is None:
        languages = sorted(p.name for p in root.iterdir() if (p / f"{split}.tsv").is_file())
    if not languages:
        raise ValueError(f"{root} has no <lang>/{split}.tsv files")
    tables = {lang: _read_sib_tsv(root / lang / f"{split}.tsv") for lang in languages}
    first = languages[0]
    order = list(tables[first])
    for lang in languages[1:]:
        path = root / lang / f"{split}.tsv"
        for index_id, (number, _) in tables[lang].items():
            if index_id not in tables[first]:
                raise ValueError(
                    f"{path}:{number}: index_id {index_id} is not in {root / first / f'{split}.tsv'}"
                )
        for index_id in order:
            if index_id not in tables[lang]:
                number = tables[first][index_id][0]
                raise ValueError(
                    f"{path}: index_id {index_id} (line {number} of "
                    f"{root / first / f'{split}.tsv'}) is missing"
                )
    if max_sentences is not None:
        order = order[:max_sentences]
    return {lang: [tables[lang][i][1] for i in order] for lang in languages}


def load_texts(
    texts: Mapping[str, Sequence[str]] | str | os.PathLike,
    languages: Sequence[str] | None,
    split: str,
    max_sentences: int | None,
) -> dict[str, list[str]]:
    """A callback's ``texts`` argument as {language: sentences}: a mapping, or a SIB-200 directory."""
    if isinstance(texts, (str, os.PathLike)):
        loaded = read_parallel_texts(texts, languages, split, max_sentences)
    else:
        chosen = list(texts) if languages is None else list(languages)
        missing = [lang for lang in chosen if lang not in texts]
        if missing:
            raise ValueError(f"no texts for languages {missing}; the texts hold {list(texts)}")
        loaded = {lang: list(texts[lang])[:max_sentences] for lang in chosen}
    if len(loaded) < 2:
        raise ValueError(f"need texts in at least 2 languages, got {list(loaded)}")
    for lang, sentences in loaded.items():
        if not sentences:
            raise ValueError(f"no sentences for language {lang}")
    return loaded


def encode_batches(
    tokenizer, sentences: Sequence[str], batch_size: int, max_length: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) batches, right-padded here so the tokenizer needs no pad token;
    with causal attention, right padding leaves the real tokens' states unchanged."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(sentences), batch_size):
        chunk = list(sentences[start : start + batch_size])
        encoded = tokenizer(chunk, truncation=True, max_length=max_length)["input_ids"]
        for offset, ids in enumerate(encoded):
            if not ids:
                raise ValueError(f"sentence {start + offset} ({chunk[offset]!r}) encodes to no tokens")
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[row, : len(ids)] = 1
        yield input_ids.to(device), mask.to(device)


def progress(total: int, description: str, enabled: bool):
    """A progress bar over the analysis batches (tqdm, which Lightning already depends on)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, disable=not enabled, leave=False, dynamic_ncols=True)


def batch_count(texts: Mapping[str, Sequence[str]], batch_size: int) -> int:
    return sum(-(-len(sentences) // batch_size) for sentences in texts.values())


def check_run_points(run_at: Sequence[str]) -> tuple[str, ...]:
    unknown = [point for point in run_at if point not in RUN_POINTS]
    if unknown:
        raise ValueError(f"unknown run_at entries {unknown}; choose from {RUN_POINTS}")
    return tuple(run_at)


def tensorboard_writer(trainer: Trainer):
    """The SummaryWriter of the trainer's TensorBoardLogger, or None when it has none."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def log_scalars(trainer: Trainer, metrics: Mapping[str, float]) -> None:
    """Scalars to every logger (not only TensorBoard), at the current global step."""
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=trainer.global_step)


def output_dir(trainer: Trainer) -> Path:
    """The run's log directory, or the trainer's root directory when there is no logger.

    Not ``trainer.log_dir``: it broadcasts from rank zero, a collective that the other ranks never
    enter while rank zero alone analyses, so a multi-process run would hang here."""
    return Path(getattr(trainer.logger, "log_dir", None) or trainer.default_root_dir)


def log_figure(trainer: Trainer, tag: str, figure) -> None:
    """A matplotlib Figure as a TensorBoard image, drawn with the Agg canvas directly so that no global
    pyplot backend is switched or left holding figures."""
    writer = tensorboard_writer(trainer)
    if writer is None:
        return
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    image = np.asarray(canvas.buffer_rgba())[..., :3]
    writer.add_image(tag, image, global_step=trainer.global_step, dataformats="HWC")


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
