"""Local files as rows: json, jsonl, csv, tsv and parquet, read with ``datasets``. When a file cannot
be used, the error names the file and line (which ``datasets``' own errors do not) and the fix."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional

import datasets

from .rows import DataError, Row, check_columns

FORMATS = ("json", "jsonl", "csv", "tsv", "parquet")
# Line number of the first data row, for formats whose rows are lines (csv/tsv have a header line).
FIRST_LINE = {"jsonl": 1, "csv": 2, "tsv": 2}
LOADERS = {
    "json": ("json", {}),
    "jsonl": ("json", {}),
    # keep_default_na=False: "NA" or "None" are words in some languages, not missing values
    "csv": ("csv", {"keep_default_na": False}),
    "tsv": ("csv", {"delimiter": "\t", "quoting": csv.QUOTE_NONE, "keep_default_na": False}),
    "parquet": ("parquet", {}),
}


def file_format(path: Path, format: Optional[str]) -> str:
    fmt = format or path.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise DataError(
            f"{path}: cannot infer the format from the extension; set format to one of {', '.join(FORMATS)}"
        )
    return fmt


def read_file(path: Path, format: Optional[str], required: dict[str, str]) -> list[Row]:
    """Every row of a file, each named by file:line (jsonl, csv, tsv) or "file row i" (json, parquet).
    ``required`` (column -> the option that needs it) must be columns of the file. An empty file has
    no rows; the caller says which language and stage that leaves without data."""
    fmt = file_format(path, format)
    if path.stat().st_size == 0:  # datasets refuses empty files
        return []
    key = str(path)
    builder, options = LOADERS[fmt]
    try:
        table = datasets.load_dataset(builder, data_files=key, split="train", **options)
    except Exception as exc:
        raise diagnose(path, fmt, exc) from exc
    first = FIRST_LINE.get(fmt)
    try:
        check_columns(table.column_names, required, key)
        return [
            Row(data, key, f"{key}:{i + first}" if first else f"{key} row {i}") for i, data in enumerate(table)
        ]
    except UnicodeDecodeError as exc:
        # pyarrow's json reader keeps invalid UTF-8 as it is; it fails only here, when a row is decoded.
        raise diagnose(path, fmt, exc) from exc


def diagnose(path: Path, fmt: str, error: Exception) -> DataError:
    """Why ``datasets`` could not read the file: the line (or row) at fault and the fix."""
    if fmt == "parquet":
        found = None
        if isinstance(error, UnicodeDecodeError):
            found = DataError(f"{path}: a text value is not valid UTF-8 ({error.reason}); write its strings as UTF-8")
    else:
        checks = {"jsonl": _bad_json_lines, "json": _bad_json, "csv": _bad_delimited, "tsv": _bad_delimited}
        # The encoding first: the other checks read the file as UTF-8.
        found = invalid_utf8(path) or checks[fmt](path, fmt)
    return found or DataError(f"{path}: cannot be read as {fmt}: {error}")


def invalid_utf8(path: Path) -> Optional[DataError]:
    """The first line holding a byte sequence that is not UTF-8, counted as the file's lines (a
    newline byte never occurs inside a UTF-8 character, so splitting the bytes at it is safe)."""
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                return _not_utf8(path, number, line, exc.start)
    return None


def _not_utf8(path: Path, number: int, line: bytes, start: int) -> DataError:
    # A byte-order mark starts UTF-16 files (Excel's "Unicode text"); otherwise latin1 is a guess.
    utf16 = number == 1 and line.startswith((b"\xff\xfe", b"\xfe\xff"))
    fix = f"iconv -f {'utf-16' if utf16 else 'latin1'} -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}"
    return DataError(
        f"{path}:{number}: not valid UTF-8 (byte 0x{line[start]:02x} at byte {start + 1} of the line); "
        f"re-encode the file as UTF-8: {fix}" + ("" if utf16 else " (with the file's actual encoding for latin1)")
    )


def _bad_json_lines(path: Path, fmt: str) -> Optional[DataError]:
    objects = 0
    with open(path, encoding="utf-8") as handle:
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
            objects += 1
    if not objects:
        return DataError(f"{path}: no rows, only blank lines; write one JSON object per line")
    return None


def _bad_json(path: Path, fmt: str) -> Optional[DataError]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        return DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}); fix the file or use format='jsonl'")
    if value in ([], {}):
        kind = "array" if value == [] else "object"
        return DataError(f"{path}: no rows (an empty JSON {kind}); write a list of objects")
    return None


def _bad_delimited(path: Path, fmt: str) -> Optional[DataError]:
    delimiter, quoting = ("\t", csv.QUOTE_NONE) if fmt == "tsv" else (",", csv.QUOTE_MINIMAL)
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle, delimiter=delimiter, quoting=quoting)
        # Blank lines are no rows: pandas, which datasets reads csv with, skips them.
        records = (fields for fields in reader if fields)
        header = next(records, None)
        if header is None:
            return DataError(f"{path}: no header and no rows; write a header line, then one row per line")
        rows = 0
        for fields in records:
            if len(fields) != len(header):
                return DataError(
                    f"{path}:{reader.line_num}: {len(fields)} fields, but the header has {len(header)} "
                    f"({', '.join(header)}); fix that row or remove it"
                )
            rows += 1
    if not rows:
        return DataError(
            f"{path}: has a header ({', '.join(header)}) but no rows; add rows below it or remove the file"
        )
    return None
