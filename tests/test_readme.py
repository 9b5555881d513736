"""README.md's map of `tda/` names every module and package there is, and nothing else."""

from __future__ import annotations

import re

from helpers.config import ROOT
from helpers.readme import code_blocks, section

NAME = re.compile(r"^\w+(\.py|/)$")


def mapped_paths() -> set[str]:
    """The paths the map names under its `tda/` line: `name.py` (several per line, separated by
    commas) in the package of the nearest `name/` line above with less indentation."""
    lines = code_blocks(section("Map of `tda/`"))[0][1].splitlines()
    start = lines.index("tda/")
    folders: dict[int, str] = {0: "tda"}  # indentation -> the folder whose entries it holds
    paths = set()
    for line in lines[start + 1:]:
        indent = len(line) - len(line.lstrip())
        names = [n for n in re.split(r"[,\s]+", re.split(r"\s{2,}", line.strip())[0]) if NAME.match(n)]
        if not names:  # a description wrapped onto its own line
            continue
        parent = folders[max(i for i in folders if i < indent)]
        folders = {i: f for i, f in folders.items() if i < indent}
        for name in names:
            paths.add(f"{parent}/{name}")
            if name.endswith("/"):
                folders[indent] = f"{parent}/{name[:-1]}"
    return paths


def test_the_map_names_every_module_of_tda():
    on_disk = {str(p.relative_to(ROOT)) for p in (ROOT / "tda").rglob("*.py") if p.name != "__init__.py"}
    on_disk |= {f"{p.parent.relative_to(ROOT)}/" for p in (ROOT / "tda").rglob("__init__.py") if p.parent.name != "tda"}
    mapped = mapped_paths()
    assert not on_disk - mapped, f"README.md's map of tda/ lacks {sorted(on_disk - mapped)}"
    assert not mapped - on_disk, f"README.md's map of tda/ names what is not there: {sorted(mapped - on_disk)}"
