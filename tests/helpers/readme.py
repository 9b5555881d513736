"""README.md read as the tests need it: the text of a section and its code blocks."""

from __future__ import annotations

import re
import textwrap

from helpers.config import ROOT

FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```$", re.MULTILINE | re.DOTALL)


def section(title: str) -> str:
    """The text under the heading `## <title>` up to the next heading of any level (a `#` line
    inside a code block is no heading)."""
    lines, inside, in_code = [], False, False
    for line in (ROOT / "README.md").read_text().splitlines(keepends=True):
        if line.lstrip().startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            if inside:
                break
            inside = line.rstrip("\n") == f"## {title}"
            continue
        if inside:
            lines.append(line)
    assert lines, f"README.md has no section '## {title}'"
    return "".join(lines)


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of each fenced block in `text`, in order, dedented (blocks inside a list
    item are indented like it)."""
    return [(lang, textwrap.dedent(code)) for _, lang, code in FENCE.findall(text)]
