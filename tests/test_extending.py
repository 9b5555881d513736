"""README.md's extension guides ("Add a method", "Add a dataset", "Add a model") run as written:
their code blocks in order, from a fresh runs directory. A file block is written where its first
line (`# <path>`) says, under a temporary folder that the package (`tda.<package>.__path__`) and
Hydra (`hydra.searchpath`) also search, so the checkout stays untouched; a command runs the stage
it names in-process, on the tiny settings. Also: every package and config group ships in the wheel."""

from __future__ import annotations

import csv
import importlib
import json
import shlex
import sys
import tomllib

import pytest
from helpers.config import ROOT, compose_config
from helpers.readme import code_blocks, section
from safetensors.torch import load_file

import tda.stages

# the commands a guide may run, and the stage each runs (as tda.cli does)
STAGES = {"python train.py": "train", "tda-train": "train", "tda-further-train": "further_train",
          "python attribute.py": "attribute", "tda-attribute": "attribute",
          "python evaluate.py": "evaluate", "tda-evaluate": "evaluate"}


@pytest.fixture
def guide(tiny, tmp_path, monkeypatch):
    """Run a README guide: returns what each of its commands' stages returned, in order."""
    tree, added = tmp_path / "guide", []
    settings = tiny + [f"hydra.searchpath=[file://{tree / 'conf'}]"]

    def run(title: str) -> list:
        results = []
        for language, code in code_blocks(section(title)):
            if language == "bash":
                results += [run_command(line.split("#")[0], settings) for line in code.splitlines()
                            if line.split("#")[0].strip()]
                continue
            first = code.splitlines()[0]
            path = first.removeprefix("# ")
            assert path != first and path.startswith(("tda/", "conf/")), \
                f"README.md, {title}: a {language} block starts with `# <its path>`, not {first!r}"
            (tree / path).parent.mkdir(parents=True, exist_ok=True)
            (tree / path).write_text(code)
            if path.startswith("tda/"):
                package = importlib.import_module(path.rsplit("/", 1)[0].replace("/", "."))
                monkeypatch.setattr(package, "__path__", [*package.__path__, str((tree / path).parent)])
                added.append((package, path.removesuffix(".py").rsplit("/", 1)[1]))
        return results

    yield run
    for package, name in added:  # the next test imports nothing of this one's
        sys.modules.pop(f"{package.__name__}.{name}", None)
        vars(package).pop(name, None)


def run_command(command: str, settings: list[str]):
    words = shlex.split(command)
    for prefix, stage in STAGES.items():
        if words[:len(prefix.split())] == prefix.split():
            cfg = compose_config(stage, settings + words[len(prefix.split()):])
            return getattr(tda.stages, stage)(cfg)
    raise AssertionError(f"README.md runs `{command.strip()}`, which is none of {sorted(STAGES)}")


def test_add_a_method(guide):
    *_, out = guide("Add a method")
    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert any("random_scores" in row.values() for row in rows), rows
    assert "random_scores" in (out / "report.md").read_text()


def test_add_a_dataset(guide):
    (run,) = guide("Add a dataset")
    metrics = json.loads((run.path / "metrics.json").read_text())
    assert run.path.name.startswith("wine-")
    assert metrics["n_train"] == 96  # the tiny settings' dataset.max_train of the 133 training wines
    assert metrics["test"]["accuracy"] > 0.6  # 3 tiny epochs; the largest class is 37.5% of the 40 test wines


def test_add_a_model(guide):
    (run,) = guide("Add a model")
    weights = load_file(run.path / "final_model.safetensors")
    assert {k: tuple(v.shape) for k, v in weights.items()} == {"linear.weight": (2, 30), "linear.bias": (2,)}
    # it learned: below the cross-entropy of a guess (ln 2), after 3 tiny epochs
    assert json.loads((run.path / "metrics.json").read_text())["test"]["loss"] < 0.6


def test_every_package_and_config_group_ships_in_the_wheel():
    """pyproject.toml lists packages explicitly (it maps conf/ to tda.conf): a new package under
    tda/ or a new config group under conf/ must be added there, or `pip install .` lacks it."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    code = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "tda").rglob("__init__.py")}
    conf = ROOT / "conf"
    groups = {".".join(("tda", "conf") + d.relative_to(conf).parts) for d in conf.rglob("*")
              if d.is_dir() and any(d.glob("*.yaml"))}
    assert code | groups | {"tda.conf"} == listed
