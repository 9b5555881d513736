"""The layering of tda is a contract that fails when broken: `[tool.importlinter]` in
pyproject.toml, checked by `lint-imports` (CI runs it beside ruff). Here it is run on a copy of
the package as it is (it holds) and on copies with one defect each (it fails, naming it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from helpers.config import ROOT

# (what is added to the copy: file -> text appended, what lint-imports must say)
DEFECTS = {
    "an upward import (a model importing the evaluation)": (
        {"tda/models/base.py": "import tda.evaluation\n"}, "tda.models.base -> tda.evaluation"),
    "a cycle between siblings of one layer (config <-> tracking)": (
        {"tda/config.py": "import tda.tracking\n"}, "- .tracking -> .config"),
    "a cycle inside a package": (
        {"tda/methods/cycle_a.py": "import tda.methods.cycle_b\n",
         "tda/methods/cycle_b.py": "import tda.methods.cycle_a\n"},
        "No cycles are allowed in tda.methods."),
    "a module the contract does not place": ({"tda/unplaced.py": "\n"}, "- tda.unplaced"),
}


def lint_imports(tree) -> subprocess.CompletedProcess:
    """`lint-imports` with the repository's contracts on the package `tda` copied under `tree`."""
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code, "--no-cache", "--no-logo"], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=120)


def copy_of_tda(tmp_path, additions: dict[str, str]):
    shutil.copytree(ROOT / "tda", tmp_path / "tda", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    for name, text in additions.items():
        with open(tmp_path / name, "a") as f:
            f.write(text)
    return tmp_path


def test_the_package_as_it_is_keeps_the_contracts(tmp_path):
    result = lint_imports(copy_of_tda(tmp_path, {}))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("defect", DEFECTS)
def test_a_broken_layering_fails_and_names_the_import(tmp_path, defect):
    additions, message = DEFECTS[defect]
    result = lint_imports(copy_of_tda(tmp_path, additions))
    assert result.returncode == 1, result.stdout + result.stderr
    assert message in result.stdout, result.stdout
