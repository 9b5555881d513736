"""Extending the framework as README.md's "Add a method" says: a module with a Method subclass
plus one YAML file that names it by `_target_`, both outside the repository (a folder on
PYTHONPATH, a config folder on `hydra.searchpath`); nothing else is registered anywhere. Also:
every package and config group ships in the wheel."""

from __future__ import annotations

import csv
import textwrap
import tomllib

from helpers.config import ROOT, compose_config

from tda.stages import attribute, evaluate, train

# README.md, "Add a method", step 1: the module (here outside the repository).
TOY_METHOD = '''
"""A baseline any method should beat: seeded standard-normal scores."""

import torch

from tda.methods.base import Method
from tda.problem import AttributionProblem


class RandomScores(Method):
    def __init__(self, seed: int = 0):
        super().__init__()
        self.seed = seed

    def scores(self, problem: AttributionProblem) -> torch.Tensor:
        """[n_test, n_left_out], positive = helpful."""
        generator = torch.Generator().manual_seed(self.seed)
        shape = (len(problem.test_indices), len(problem.left_out_indices))
        self.record["seed"] = self.seed  # anything worth keeping goes to record.json
        return torch.randn(shape, generator=generator, dtype=torch.float64)
'''

# Step 2: its config, `conf/method/<name>.yaml` (here in a config folder of one's own).
TOY_CONFIG = """
_target_: toy_methods.RandomScores
name: random_scores
seed: 0
"""


def test_a_method_added_from_outside_the_repository_is_attributed_and_evaluated(tiny, tmp_path, monkeypatch):
    code, conf = tmp_path / "code", tmp_path / "my_conf"
    (conf / "method").mkdir(parents=True)
    code.mkdir()
    (code / "toy_methods.py").write_text(textwrap.dedent(TOY_METHOD))
    (conf / "method" / "random_scores.yaml").write_text(textwrap.dedent(TOY_CONFIG))
    monkeypatch.syspath_prepend(str(code))  # PYTHONPATH=code on the command line
    search = f"hydra.searchpath=[file://{conf}]"

    # Step 3: the usual commands, with the config folder on Hydra's search path.
    train(compose_config("train", tiny + [search]))
    for method in ("further_training", "random_scores"):
        attribute(compose_config("attribute", tiny + [search, f"method={method}"]))
    out = evaluate(compose_config("evaluate", tiny + [search]))

    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert any("random_scores" in row.values() for row in rows), rows
    assert "random_scores" in (out / "report.md").read_text()


def test_every_package_and_config_group_ships_in_the_wheel():
    """pyproject.toml lists packages explicitly (it maps conf/ to tda.conf): a new package under
    tda/ or a new config group under conf/ must be added there, or `pip install .` lacks it."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    code = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "tda").rglob("__init__.py")}
    conf = ROOT / "conf"
    groups = {".".join(("tda", "conf") + d.relative_to(conf).parts) for d in conf.rglob("*")
              if d.is_dir() and any(d.glob("*.yaml"))}
    assert code | groups | {"tda.conf"} == listed
