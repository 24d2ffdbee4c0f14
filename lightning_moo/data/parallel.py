"""Parallel sentences (the same sentences in every language) for analysis: SIB-200 style TSVs
(``<dir>/<lang>/<split>.tsv``), an analysis callback's ``texts`` argument, and right-padded batches."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch

from .sampling import pad

TSV_COLUMNS = ("index_id", "category", "text")


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
        input_ids = pad(encoded, pad_id)
        mask = pad([[1] * len(ids) for ids in encoded], 0)
        yield input_ids.to(device), mask.to(device)
