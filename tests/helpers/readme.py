"""README.md read as the tests need it: the text of a section and its code blocks."""

from __future__ import annotations

import re
import textwrap

from helpers.config import ROOT

FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```$", re.MULTILINE | re.DOTALL)


def section(title: str) -> str:
    """The text under the heading `## <title>` up to the next heading of any level."""
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^#+ |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"README.md has no section '## {title}'"
    return match.group(1)


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of each fenced block in `text`, in order, dedented (blocks inside a list
    item are indented like it)."""
    return [(lang, textwrap.dedent(code)) for _, lang, code in FENCE.findall(text)]
