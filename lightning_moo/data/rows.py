"""What every source yields: rows that remember where they came from, and the error that names
that place and the fix."""

from __future__ import annotations

from typing import NamedTuple

STAGES = ("train", "validation", "test")


class DataError(ValueError):
    """The data cannot be used as configured; the message names the file, the row and the fix."""


class Row(NamedTuple):
    data: dict
    file: str  # the file (or hub dataset and split) the row came from
    where: str  # "file:line" for line-based formats, "file row i" otherwise


def check_columns(columns: list[str], required: dict[str, str], where: str) -> None:
    """Fails on the first column of ``required`` (column -> the option that needs it) that the table
    lacks, listing the columns it has: a misspelt option is the usual cause."""
    for column, option in required.items():
        if column not in columns:
            raise DataError(
                f"{where}: missing column {column!r} (needed by {option}); available columns: "
                f"{', '.join(columns)}; set {option} to one of them or fix the file"
            )
