"""The LightningDataModule: checks its options, finds the rows (``sources``), encodes them once per
language and stage (``encoding``), and serves loaders whose batches each hold one language
(``sampling``), placing the training languages on ranks by the run's :class:`LanguageLayout`."""

from __future__ import annotations

from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from .. import _compat
from ..layout import LanguageLayout
from .encoding import Encoder, check_options, required_columns
from .files import FORMATS
from .rows import STAGES, DataError, Row
from .sampling import Collate, EpochShuffleSampler, ShardSampler
from .sources import Source, open_source


class MultilingualDataModule(pl.LightningDataModule):
    """Training languages placed on ranks by a :class:`~lightning_moo.layout.LanguageLayout`: one
    language per rank, k ranks per language (each on its own share of the language's rows), or m
    languages per rank (one loader each); evaluation of seen and unseen languages, one dataloader per
    language, sharded over ranks.

    Args:
        train_languages: Training languages. The world size must be a multiple of their number (one
            language per rank, or k ranks per language) or divide it (m languages per rank).
        seen_languages: Languages evaluated as "seen"; default: ``train_languages``.
        unseen_languages: Languages evaluated as "unseen" (never trained on); default none.
        source: "builtin" (offline corpus of the dataset-build package), a local directory (with
            ``file_pattern``), a local file (with ``language_column``), or a Hugging Face hub dataset.
        file_pattern: Files under the ``source`` directory, with placeholders ``{language}`` and
            ``{split}``, e.g. "{language}/{split}.tsv" or "{language}.jsonl". Without ``{split}`` the
            splits are held out (row i of a language: i % 10 == 8 validation, 9 test, else train).
        language_column: The column that names each row's language (one file or dataset for all).
        format: json, jsonl, csv, tsv or parquet; default: from the file extension.
        splits: Stage ("train", "validation", "test") to split name, merged into the identity mapping.
        text_field: The column of plain text (loss on every token).
        prompt_template: Instruction data: ``str.format`` over the row's columns, e.g.
            "Sentence: {text}\\nTopic:"; no loss on it.
        response_template: The response, e.g. " {category}"; the loss covers only its tokens and EOS.
        messages_field: Chat data: a column of ``{"role", "content"}`` lists; the last assistant message
            is the response, the messages before it the prompt (tokenizer's chat template).
        chat_template: Wrap the rendered prompt as one user message in the tokenizer's chat template.
        label_field: Classification: the column with the label; the response when no template is set.
        labels: The label set; evaluation batches then carry one candidate sequence per label.
        max_length: Longest sequence in tokens (special tokens included).
        truncation: Rows longer than ``max_length``: "truncate" (cut the prompt from the left, plain
            text at the end), "drop" (skip the row) or "error".
        batch_size: Training batch size per rank.
        eval_batch_size: Evaluation batch size; default ``batch_size``.
        max_eval_examples: Keep N evenly spaced rows per language and evaluation split (rows
            ⌊i·len/N⌋: a file sorted by label keeps its mix of labels; parallel files keep the same
            sentences in every language).
        seed: Seed of the per-epoch shuffling.
        num_workers: DataLoader worker processes.
        tokenizer: A transformers tokenizer; default: ``tokenizer`` of the trainer's LightningModule.
    """

    def __init__(
        self,
        train_languages: list[str],
        seen_languages: Optional[list[str]] = None,
        unseen_languages: Optional[list[str]] = None,
        source: str = "builtin",
        file_pattern: Optional[str] = None,
        language_column: Optional[str] = None,
        format: Optional[str] = None,
        splits: Optional[dict[str, str]] = None,
        text_field: str = "text",
        prompt_template: Optional[str] = None,
        response_template: Optional[str] = None,
        messages_field: Optional[str] = None,
        chat_template: bool = False,
        label_field: Optional[str] = None,
        labels: Optional[list[str]] = None,
        max_length: int = 256,
        truncation: str = "truncate",
        batch_size: int = 8,
        eval_batch_size: Optional[int] = None,
        max_eval_examples: Optional[int] = None,
        seed: int = 0,
        num_workers: int = 0,
        tokenizer: Optional[Any] = None,
    ):
        super().__init__()
        if not train_languages:
            raise ValueError("train_languages is empty: name the languages to train")
        check_options(truncation, prompt_template, response_template, label_field)
        if format is not None and format not in FORMATS:
            raise ValueError(f"format={format!r} is not one of {', '.join(FORMATS)}")
        unknown_stages = set(splits or {}) - set(STAGES)
        if unknown_stages:
            raise ValueError(f"splits has keys {sorted(unknown_stages)}; the stages are {', '.join(STAGES)}")
        if file_pattern and ("{language}" in file_pattern) == bool(language_column):
            raise ValueError(
                f"file_pattern={file_pattern!r}: use the {{language}} placeholder for one file per language, "
                "or language_column (and no {language}) for files that hold every language"
            )
        self.train_languages = list(train_languages)
        self.seen_languages = list(dict.fromkeys(train_languages if seen_languages is None else seen_languages))
        self.unseen_languages = list(dict.fromkeys(unseen_languages or []))
        both = [lang for lang in self.unseen_languages if lang in self.seen_languages]
        if both:
            raise ValueError(f"languages both seen and unseen: {', '.join(both)}")
        self.source, self.file_pattern, self.language_column, self.format = (
            source, file_pattern, language_column, format
        )
        self.splits = {**{stage: stage for stage in STAGES}, **(splits or {})}
        self.text_field = text_field
        self.prompt_template, self.response_template = prompt_template, response_template
        self.messages_field, self.chat_template = messages_field, chat_template
        self.label_field, self.labels = label_field, None if labels is None else [str(x) for x in labels]
        self.max_length, self.truncation = max_length, truncation
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.max_eval_examples, self.seed, self.num_workers = max_eval_examples, seed, num_workers
        self.tokenizer = tokenizer
        self.examples: dict[tuple[str, str], list[dict]] = {}  # (language, stage) -> encoded examples
        self.report: dict[tuple[str, str], dict[str, int]] = {}  # (language, stage) -> row counts
        self._source: Optional[Source] = None
        self._encoder: Optional[Encoder] = None
        # (the trainer and the strategy's layout it was built for, the layout)
        self._layout: Optional[tuple[Any, Optional[LanguageLayout], LanguageLayout]] = None
        self._resume: Optional[tuple[int, int]] = None  # (epoch, batches already trained in it)
        self._train_batches: Optional[int] = None
        # A language with fewer evaluation rows than ranks leaves some shards empty; that is correct.
        self.allow_zero_length_dataloader_with_multiple_devices = True

    # ----- languages and ranks -----

    @property
    def eval_languages(self) -> list[str]:
        return self.seen_languages + self.unseen_languages

    def language_kind(self, language: str) -> str:
        if language in self.seen_languages:
            return "seen"
        if language in self.unseen_languages:
            return "unseen"
        raise KeyError(f"{language!r} is not an evaluation language ({', '.join(self.eval_languages)})")

    def _rank_and_world(self) -> tuple[int, int]:
        return (0, 1) if self.trainer is None else (self.trainer.global_rank, self.trainer.world_size)

    @property
    def layout(self) -> LanguageLayout:
        """Which rank trains which language: the strategy's layout when it has one, so that data and
        gradients agree, else one built here for the trainer's world size (1 without a trainer).
        Built once per trainer (tests and tools attach other trainers to the same DataModule)."""
        trainer = self.trainer
        given = getattr(getattr(trainer, "strategy", None), "layout", None)
        if self._layout is None or self._layout[0] is not trainer or self._layout[1] is not given:
            self._layout = (trainer, given, self._own_layout(given, self._rank_and_world()[1]))
        return self._layout[2]

    def _own_layout(self, given: Optional[LanguageLayout], world: int) -> LanguageLayout:
        names = tuple(self.train_languages)
        what = f"the {len(names)} train_languages ({', '.join(names)})"
        if given is None:
            return LanguageLayout.build(names, world, what=what)
        if given.names == names:
            return given
        # A strategy given only a count of languages (or none: one per rank) names them "0", "1", ...:
        # its shape, our names.
        if given.names == tuple(map(str, range(len(names)))):
            return LanguageLayout.build(names, given.world_size, what=what)
        raise ValueError(
            f"the strategy trains the languages ({', '.join(given.names)}), but data.train_languages is "
            f"({', '.join(names)}); give the strategy the same languages in the same order (the CLI does "
            "when strategy.languages is unset)"
        )

    @property
    def rank_train_languages(self) -> list[str]:
        """The languages this rank trains: one (also when k ranks share it), or m consecutive ones."""
        layout = self.layout
        return [layout.names[t] for t in layout.languages_of(self._rank_and_world()[0])]

    @property
    def train_language(self) -> str:
        languages = self.rank_train_languages
        if len(languages) > 1:
            raise ValueError(f"this rank trains {len(languages)} languages; use rank_train_languages")
        return languages[0]

    # ----- rows and examples -----

    def _open_source(self) -> Source:
        if self._source is None:
            required = required_columns(self.text_field, self.prompt_template, self.response_template,
                                        self.messages_field, self.label_field)
            self._source = open_source(
                self.source, self.file_pattern, self.language_column, self.format, self.splits, required,
                max_bytes=self.max_length - 1,  # builtin rows leave room for EOS
            )
        return self._source

    def load_rows(self, language: str, stage: str) -> list[Row]:
        """The raw rows of one language and stage, each with its origin (file, line)."""
        rows = self._open_source().rows(language, stage)
        if stage != "train" and self.max_eval_examples is not None and len(rows) > self.max_eval_examples:
            # Evenly spaced rows, not the first N: files sorted by label (SIB-200 is) keep their mix.
            # The same positions in every language, so parallel files give the same sentences.
            step = len(rows) / self.max_eval_examples
            rows = [rows[int(i * step)] for i in range(self.max_eval_examples)]
        return rows

    @property
    def encoder(self) -> Encoder:
        """The :class:`Encoder` of these options and the current tokenizer."""
        if self._encoder is None or self._encoder.tokenizer is not self.tokenizer:
            self._encoder = self._build_encoder()
        return self._encoder

    def _build_encoder(self) -> Encoder:
        if self.tokenizer is None:
            raise ValueError("no tokenizer: pass tokenizer= or give the LightningModule a `tokenizer` attribute")
        return Encoder(
            self.tokenizer, max_length=self.max_length, truncation=self.truncation, text_field=self.text_field,
            prompt_template=self.prompt_template, response_template=self.response_template,
            messages_field=self.messages_field, chat_template=self.chat_template,
            label_field=self.label_field, labels=self.labels,
        )

    def encode(self, rows: list[Row], with_choices: bool = False) -> tuple[list[dict], dict[str, int]]:
        """See :meth:`Encoder.encode`."""
        return self.encoder.encode(rows, with_choices)

    def _prepare(self, language: str, stage: str) -> None:
        if (language, stage) in self.examples:
            return
        rows = self.load_rows(language, stage)
        examples, counts = self.encode(rows, with_choices=stage != "train")
        counts["examples"] = len(examples)
        self.report[(language, stage)] = counts
        if not examples:
            raise DataError(
                f"{rows[0].file}: no {stage} examples left for language {language!r}: of {counts['rows']} rows, "
                f"{counts['empty']} have empty text and {counts['dropped']} are longer than "
                f"max_length={self.max_length} (truncation='drop'); fix the data, or raise max_length"
            )
        if counts["truncated"] or counts["dropped"]:
            rank_zero_warn(
                f"{language} {stage}: of {counts['rows']} rows, {counts['truncated']} truncated and "
                f"{counts['dropped']} dropped as longer than max_length={self.max_length} "
                f"(truncation={self.truncation!r})"
            )
        rank_zero_info(f"{language} {stage}: {len(examples)} examples ({counts})")
        self.examples[(language, stage)] = examples

    # ----- Lightning hooks -----

    def prepare_data(self) -> None:
        # Opening the source fails early, with the fix, when the corpus package or a local path is missing.
        self._open_source()

    def setup(self, stage: Optional[str] = None) -> None:
        if self.tokenizer is None:
            module = None if self.trainer is None else self.trainer.lightning_module
            self.tokenizer = getattr(module, "tokenizer", None)
        # Building the encoder checks the tokenizer against the options, before any data is read.
        self._encoder = self._build_encoder()
        rank, world = self._rank_and_world()
        if world > 1 and _compat.uses_distributed_sampler(self.trainer):
            raise ValueError(
                "MultilingualDataModule shards its own data (training languages by the layout, evaluation "
                "by rank): set trainer.use_distributed_sampler: false"
            )
        steps = {"fit": ("train", "validation"), "validate": ("validation",), "test": ("test",), "predict": ("test",)}
        for step in steps.get(stage, STAGES):
            for language in self.rank_train_languages if step == "train" else self.eval_languages:
                self._prepare(language, step)
        if (stage in (None, "fit")) and self._train_batches is None:
            self._train_batches = self._batches_per_epoch(world)

    def _batches_per_epoch(self, world: int) -> int:
        """Training batches per epoch, the same on every rank and language (the smallest language
        sets it), so the ranks step together."""
        k = self.layout.ranks_per_language
        sizes = {language: len(self.examples[(language, "train")]) // k for language in self.rank_train_languages}
        smallest = min(sizes, key=sizes.get)
        batches = sizes[smallest] // self.batch_size
        if world > 1:
            strategy = self.trainer.strategy
            local = torch.tensor(batches, device=strategy.root_device)
            batches = int(strategy.reduce(local, reduce_op="min"))
        if batches == 0:
            raise DataError(
                f"{sizes[smallest]} training examples for {smallest!r} make no full batch of batch_size="
                f"{self.batch_size} (on this or another rank); lower batch_size or add data"
            )
        return batches

    def train_dataloader(self) -> Union[DataLoader, list[DataLoader]]:
        """This rank's language's loader; with several languages per rank, one per language (Lightning
        then yields a list of their batches, in language order)."""
        languages = self.rank_train_languages
        for language in languages:
            # Lightning's DeepSpeed strategy asks for it outside fit too (to read the batch size).
            self._prepare(language, "train")
        rank, world = self._rank_and_world()
        if self._train_batches is None:
            self._train_batches = self._batches_per_epoch(world)
        replicas, replica = self.layout.ranks_per_language, self.layout.replica_of(rank)
        loaders = []
        for language in languages:
            examples = self.examples[(language, "train")]
            sampler = EpochShuffleSampler(
                len(examples), self.seed, language, self._train_batches * self.batch_size, replica, replicas
            )
            if self._resume is not None:
                sampler.resume(self._resume[0], self._resume[1] * self.batch_size)
            loaders.append(
                DataLoader(
                    examples,
                    batch_size=self.batch_size,
                    sampler=sampler,
                    drop_last=True,
                    collate_fn=Collate(self.encoder.pad_id, language),
                    num_workers=self.num_workers,
                )
            )
        self._resume = None
        return loaders[0] if len(loaders) == 1 else loaders

    def _eval_loaders(self, stage: str) -> list[DataLoader]:
        rank, world = self._rank_and_world()
        loaders = []
        for language in self.eval_languages:
            examples = self.examples[(language, stage)]
            loaders.append(
                DataLoader(
                    examples,
                    batch_size=self.eval_batch_size,
                    sampler=ShardSampler(len(examples), rank, world),
                    collate_fn=Collate(self.encoder.pad_id, language),
                    num_workers=self.num_workers,
                )
            )
        return loaders

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("validation")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("test")

    def predict_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("test")

    # ----- exact resume -----

    def state_dict(self) -> dict[str, int]:
        """The epoch and how many of its training batches were trained on. ModelCheckpoint saves in
        on_train_batch_end, where the loop's ``processed`` counter already includes the current batch
        (``completed`` does not yet); the prefetched batch is not counted by either."""
        if self.trainer is None:
            return {}
        loop = self.trainer.fit_loop
        return {
            "epoch": loop.epoch_progress.current.processed,
            "batches": loop.epoch_loop.batch_progress.current.processed,
        }

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        if state_dict:
            self._resume = (state_dict["epoch"], state_dict["batches"])
