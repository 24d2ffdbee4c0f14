"""Every ```python block of README.md runs, so the guide's examples stay true.

Each block runs on its own, in a fresh namespace (a reader may copy any one block), in a temporary
working directory, in this process: blocks must be quick, offline, CPU-only and start no processes.
Blocks are compiled with README.md's line numbers, so a traceback points into the README; the
test id is ``README.md:<line>`` of the block's opening fence. Shell commands belong in ```bash
blocks, which are not run.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line of the opening fence, code)`` for every fenced block whose info string is python."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.groups()
        start, body, i = i + 1, [], i + 1
        while i < len(lines) and not (lines[i].strip().startswith(fence[0] * len(fence)) and lines[i].strip().strip(fence[0]) == ""):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"README.md:{start}: the ``` block opened here is never closed")
        i += 1
        if lang.lower() in ("python", "py"):
            blocks.append((start, "\n".join(body) + "\n"))
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 3, f"README.md has {len(BLOCKS)} ```python blocks; the guide's examples are gone"


def test_the_block_finder():
    text = "intro\n```python\na = 1\n```\n\n```bash\nmake test\n```\n````python\nb = '```'\n````\n"
    assert python_blocks(text) == [(2, "a = 1\n"), (9, "b = '```'\n")]


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_block_runs(line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything a block writes (e.g. a logger's directory) lands here
    # Pad with blank lines so that the code's line numbers are README.md's.
    compiled = compile("\n" * line + code, str(README), "exec")
    try:
        exec(compiled, {"__name__": f"readme_block_{line}"})
    except Exception as error:
        pytest.fail(f"the ```python block at README.md:{line} failed: {type(error).__name__}: {error}")
