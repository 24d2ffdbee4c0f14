"""Where a language's rows come from, behind one interface: ``Source.rows(language, stage)``.

Four sources, chosen by :func:`open_source` from the DataModule's ``source`` and its options:

- :class:`BuiltinSource`: the offline corpus of the dataset-build package (``source="builtin"``);
- :class:`FilePerLanguage`: a directory with one file per language (and split), ``file_pattern``
  with a ``{language}`` placeholder;
- :class:`LanguageColumnFiles`: one file, or a directory with one file per split, holding every
  language, each row naming its language in ``language_column``;
- :class:`HubSource`: a Hugging Face hub dataset, one config per language or a language column.

Data without splits is held out: a language's i-th row goes to ``HOLDOUT[i % 10]``, the rest to train.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Optional

import datasets

from .builtin import builtin_root, builtin_rows
from .files import read_file
from .rows import STAGES, DataError, Row, check_columns

# Data without splits: a language's i-th row goes to HOLDOUT[i % 10], the rest to train (10% / 10%).
HOLDOUT = {8: "validation", 9: "test"}


class Source(ABC):
    """Where the rows come from; the DataModule asks nothing else of it."""

    @abstractmethod
    def rows(self, language: str, stage: str) -> list[Row]:
        """The rows of one language and stage, each with its origin; a DataError names what is missing."""


def open_source(
    source: str,
    file_pattern: Optional[str] = None,
    language_column: Optional[str] = None,
    format: Optional[str] = None,
    splits: Optional[dict[str, str]] = None,
    required: Optional[dict[str, str]] = None,
    max_bytes: int = 255,
) -> Source:
    """The source that ``source`` names: "builtin", a directory (with ``file_pattern``), a file (with
    ``language_column``) or else a hub dataset. ``splits`` maps stages to split names; ``required``
    (column -> the option that needs it) are the columns the rows must have; ``max_bytes`` is the
    longest builtin row in UTF-8 bytes."""
    splits = {**{stage: stage for stage in STAGES}, **(splits or {})}
    required = {**(required or {}), **({language_column: "language_column"} if language_column else {})}
    local = Path(source)
    if source == "builtin":
        return BuiltinSource(max_bytes)
    if local.is_dir():
        if not file_pattern:
            raise DataError(f"{local} is a directory: set file_pattern, e.g. '{{language}}/{{split}}.jsonl'")
        if language_column:
            return LanguageColumnFiles(source, file_pattern, language_column, format, splits, required)
        return FilePerLanguage(local, file_pattern, format, splits, required)
    if local.is_file():
        if not language_column:
            raise DataError(f"{local} is one file: set language_column, or use a directory and file_pattern")
        return LanguageColumnFiles(source, None, language_column, format, splits, required)
    if os.path.isabs(source) or source.startswith((".", "~")):
        raise DataError(f"source {source!r} does not exist")
    return HubSource(source, language_column, splits, required)


class BuiltinSource(Source):
    """The dataset-build corpus, cut into rows of at most ``max_bytes``; splits held out."""

    def __init__(self, max_bytes: int):
        builtin_root()  # fails with the install command when the package is missing
        self.max_bytes = max_bytes
        self._rows: dict[str, list[Row]] = {}

    def rows(self, language: str, stage: str) -> list[Row]:
        if language not in self._rows:
            self._rows[language] = builtin_rows(language, self.max_bytes)
        return require(holdout(self._rows[language], stage), f"builtin corpus ({language})", language, stage)


class _LocalFiles(Source):
    """Reads each file once, however many languages and stages take rows from it."""

    def __init__(self, format: Optional[str], splits: dict[str, str], required: dict[str, str]):
        self.format, self.splits, self.required = format, splits, required
        self._tables: dict[str, list[Row]] = {}

    def _read(self, path: Path) -> list[Row]:
        if str(path) not in self._tables:
            self._tables[str(path)] = read_file(path, self.format, self.required)
        return self._tables[str(path)]


class FilePerLanguage(_LocalFiles):
    """``root / pattern.format(language=..., split=...)``; without ``{split}`` the splits are held out."""

    def __init__(self, root: Path, pattern: str, format: Optional[str], splits: dict[str, str],
                 required: dict[str, str]):
        super().__init__(format, splits, required)
        self.root, self.pattern = root, pattern

    def rows(self, language: str, stage: str) -> list[Row]:
        path = self._file(language, self.splits[stage])
        rows = self._read(path)
        if "{split}" not in self.pattern:
            rows = holdout(rows, stage)
        return require(rows, str(path), language, stage, path)

    def _file(self, language: str, split: str) -> Path:
        path = self.root / self.pattern.format(language=language, split=split)
        if not path.is_file():
            # The languages that do have a file: the pattern with {language} as a wildcard.
            found = re.escape(self.pattern).replace(re.escape("{language}"), "(?P<language>[^/]+)")
            found = re.compile(found.replace(re.escape("{split}"), re.escape(split)))
            glob = self.pattern.format(language="*", split=split)
            available = sorted(
                m["language"]
                for p in self.root.glob(glob)
                if (m := found.fullmatch(p.relative_to(self.root).as_posix()))
            )
            raise DataError(
                f"unknown language {language!r}: {path} does not exist (file_pattern={self.pattern!r}, "
                f"split {split!r}); languages with such files: {', '.join(available) or 'none'}"
            )
        return path


class LanguageColumnFiles(_LocalFiles):
    """Every language in one file (``pattern`` None: ``source`` is the file, splits held out) or in one
    file per split (``source`` a directory, ``pattern`` without ``{language}``)."""

    def __init__(self, source: str, pattern: Optional[str], column: str, format: Optional[str],
                 splits: dict[str, str], required: dict[str, str]):
        super().__init__(format, splits, required)
        self.source, self.pattern, self.column = source, pattern, column

    def rows(self, language: str, stage: str) -> list[Row]:
        if self.pattern is None:
            path, where = Path(self.source), self.source
        else:
            split = self.splits[stage]
            path = Path(self.source) / self.pattern.format(split=split)
            where = str(path)
            if not path.is_file():
                raise DataError(f"{path} does not exist (file_pattern={self.pattern!r}, split {split!r})")
        rows = of_language(self._read(path), language, self.column, where)
        if self.pattern is None or "{split}" not in self.pattern:
            rows = holdout(rows, stage)
        return require(rows, where, language, stage, path)


class HubSource(Source):
    """``load_dataset(name, split=...)`` filtered by ``column``, or without a column one config per
    language: ``load_dataset(name, language, split=...)``."""

    def __init__(self, name: str, column: Optional[str], splits: dict[str, str], required: dict[str, str]):
        self.name, self.column, self.splits, self.required = name, column, splits, required

    def rows(self, language: str, stage: str) -> list[Row]:
        split = self.splits[stage]
        where = f"{self.name} [{split}]"
        table = datasets.load_dataset(self.name, None if self.column else language, split=split)
        check_columns(table.column_names, self.required, where)
        rows = [Row(data, where, f"{where} row {i}") for i, data in enumerate(table)]
        if self.column:
            rows = of_language(rows, language, self.column, where)
        return require(rows, where, language, stage)


def holdout(rows: list[Row], stage: str) -> list[Row]:
    """The rows of ``stage`` from data without splits: row i is validation when i % 10 == 8, test when
    i % 10 == 9, else train; independent of any seed, so every rank and run splits alike."""
    return [row for i, row in enumerate(rows) if HOLDOUT.get(i % 10, "train") == stage]


def of_language(rows: list[Row], language: str, column: str, where: str) -> list[Row]:
    mine = [row for row in rows if str(row.data[column]) == language]
    if not mine and rows:
        values = sorted({str(row.data[column]) for row in rows})
        raise DataError(
            f"{where}: unknown language {language!r}: no row has it in column {column!r}; "
            f"languages there: {', '.join(values)}"
        )
    return mine


def require(rows: list[Row], where: str, language: str, stage: str, file: Optional[Path] = None) -> list[Row]:
    """The rows, unless there are none."""
    if not rows:
        empty = " (the file is empty)" if file is not None and file.stat().st_size == 0 else ""
        raise DataError(f"{where}: no {stage} rows for language {language!r}{empty}; add rows or remove the language")
    return rows
