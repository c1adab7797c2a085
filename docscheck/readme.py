"""The README's fenced code blocks that a check runs, and the blocks generated from the code.

A code block is checked when an HTML comment right above it names it:

    <!-- readme-check: predict -->
    ```bash
    curl -F file=@... localhost:3000/predict
    ```

`tests/test_readme.py` runs (or compares) every named block, and fails on a
name it has no check for, so a new marker cannot be silently ignored. A
generated block sits between two comments and is rewritten by its make verb:

    <!-- begin generated: settings-table (make settings-table) -->
    ...
    <!-- end generated: settings-table -->
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
README = REPO_ROOT / "README.md"
CHECK_MARKER = re.compile(r"^<!-- readme-check: ([a-z0-9-]+) -->$")
FENCE = re.compile(r"^```([a-z]*)\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced code block: its language tag, its text, and its first line number in the README."""

    name: str
    language: str
    text: str
    line: int


def checked_blocks(text: str) -> dict[str, Block]:
    """Every code block named by a `readme-check` comment directly above it."""
    lines = text.splitlines()
    blocks: dict[str, Block] = {}
    for index, line in enumerate(lines):
        marker = CHECK_MARKER.match(line.strip())
        if marker is None:
            continue
        name = marker.group(1)
        fence = FENCE.match(lines[index + 1]) if index + 1 < len(lines) else None
        if fence is None:
            raise ValueError(f"README line {index + 1}: marker {name!r} is not right above a ``` code block")
        end = next(i for i in range(index + 2, len(lines)) if lines[i].strip() == "```")
        if name in blocks:
            raise ValueError(f"README line {index + 1}: marker {name!r} used twice")
        blocks[name] = Block(name, fence.group(1), "\n".join(lines[index + 2:end]), index + 3)
    return blocks


def _generated_span(text: str, name: str) -> tuple[int, int]:
    begin = re.search(rf"^<!-- begin generated: {re.escape(name)}\b.*-->\n", text, re.MULTILINE)
    end = re.search(rf"^<!-- end generated: {re.escape(name)} -->$", text, re.MULTILINE)
    if begin is None or end is None or end.start() < begin.end():
        raise ValueError(f"the README has no generated block {name!r}")
    return begin.end(), end.start()


def generated_block(text: str, name: str) -> str:
    """The text between a generated block's two comments."""
    start, stop = _generated_span(text, name)
    return text[start:stop].strip("\n")


def with_generated_block(text: str, name: str, content: str) -> str:
    """`text` with a generated block's content replaced."""
    start, stop = _generated_span(text, name)
    return text[:start] + content.strip("\n") + "\n" + text[stop:]
