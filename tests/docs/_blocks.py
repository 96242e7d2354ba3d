"""The fenced code blocks of a Markdown file, and what the page says about running them.

A ``python`` block claims to run, as written. Two HTML comments, invisible on the rendered page,
qualify that claim for the block that follows them:

- ``<!-- fragment: why -->``: the block is an excerpt (a plugin's file, a shape to copy) and is not
  run on its own; the reason is required.
- ``<!-- setup: python code -->``: code the test runs before the block, standing for what the page's
  prose says the reader already has (a model, a batch); the block itself still runs as written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_FENCE = re.compile(r"^```(\S*)\s*$")
_FRAGMENT = re.compile(r"^<!--\s*fragment:\s*(.*?)\s*-->\s*$")
_SETUP_OPEN = re.compile(r"^<!--\s*setup:\s*$")


@dataclass(frozen=True, slots=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    setup: str
    fragment_reason: str | None

    @property
    def where(self) -> str:
        return f"{self.path.name}:{self.line}"


def blocks(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    setup: list[str] = []
    reason: str | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if _SETUP_OPEN.match(line):
            end = lines.index("-->", i + 1)
            setup = lines[i + 1 : end]
            i = end + 1
            continue
        if match := _FRAGMENT.match(line):
            reason = match.group(1)
            i += 1
            continue
        if match := _FENCE.match(line):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            found.append(
                Block(
                    path=path,
                    line=i + 1,
                    language=match.group(1),
                    code="\n".join(lines[i + 1 : end]) + "\n",
                    setup="\n".join(setup) + "\n" if setup else "",
                    fragment_reason=reason,
                )
            )
            setup, reason = [], None
            i = end + 1
            continue
        if line.strip():
            # A marker qualifies only the block right after it (blank lines aside).
            setup, reason = [], None
        i += 1
    return found
