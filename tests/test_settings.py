"""Typed config sections (tda.preflight.SECTIONS), the Trainer pass-through, and user errors at
the command line: one message, exit status 2, the traceback only with HYDRA_FULL_ERROR=1."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
from conftest import ROOT, compose_config

from tda.config import ConfigError, build, to_container
from tda.further_training.settings import FurtherTrainingSettings
from tda.preflight import SECTIONS, check_config
from tda.runs import RunDir
from tda.sections import Section
from tda.stages import train
from tda.training import TrainerSettings, TrainSettings, final_trainer


# ------------------------------------------------------------------ conf/common.yaml = the dataclasses
def _defaults_and_yaml(section: type[Section], yaml: dict, path: str) -> list[str]:
    """Where conf/common.yaml and the section's dataclass disagree: keys and default values."""
    fields = {f.name: f for f in dataclasses.fields(section)
              if not (section is TrainerSettings and f.name == "lightning")}  # `+trainer.<argument>` only
    default = section()
    drift = [f"{path}.{k}: in the YAML, not in {section.__name__}" for k in yaml if k not in fields]
    drift += [f"{path}.{k}: in {section.__name__}, not in the YAML" for k in fields if k not in yaml]
    for name in set(fields) & set(yaml):
        value = getattr(default, name)
        if isinstance(value, Section):
            drift += _defaults_and_yaml(type(value), yaml[name], f"{path}.{name}")
        elif value != yaml[name] or type(value) is not type(yaml[name]) and not isinstance(value, float):
            drift.append(f"{path}.{name}: YAML {yaml[name]!r}, {section.__name__} {value!r}")
    return drift


def test_yaml_defaults_equal_the_dataclass_defaults():
    cfg = compose_config("train")
    drift = []
    for key, section in SECTIONS.items():
        drift += _defaults_and_yaml(section, to_container(cfg[key]), key)
    assert not drift


def test_every_setting_says_what_it_is():
    for section in list(SECTIONS.values()):
        for f in dataclasses.fields(section):
            assert f.metadata.get("help"), f"{section.__name__}.{f.name} has no help text"


def test_a_section_checks_itself_when_built():
    with pytest.raises(ConfigError, match=r"further_training.n_seeds=0 must be positive; the gold standard averages"):
        FurtherTrainingSettings(n_seeds=0)
    with pytest.raises(ConfigError, match=r"train.epochs='3' is a str, but it must be a int \(default: 30\)"):
        TrainSettings(epochs="3")
    assert TrainSettings(dtype="bf16").precision == "bf16-mixed"


@pytest.mark.parametrize("override, expect", [
    ("+evaluate.examples.kk=1", r"evaluate.examples.kk is not a setting .* did you mean evaluate.examples.k\?"),
    ("+further_training.left_out_shard.countt=2", r"did you mean further_training.left_out_shard.count\?"),
    ("evaluate.sorted_checkpoints=[first,lastt]", r"evaluate.sorted_checkpoints=\['first', 'lastt'\] is a list, but "
                                                  r"it must be a list of 'first' or 'middle' or 'last' or int"),
    ("further_training.sparse_input=maybe", r"further_training.sparse_input='maybe' is a str, but it must be a "
                                            r"'auto' or bool"),
    ("further_training.engine=stackd", r"further_training.engine='stackd' is not one of \['stacked', 'reference'\]"),
    ("seed=-1", r"seed=-1 must be a non-negative integer"),
])
def test_nested_keys_and_typed_choices_are_checked(tiny, override, expect):
    with pytest.raises(ConfigError, match=expect):
        check_config(compose_config("train", tiny + [override]), "train")


def test_target_node_is_checked_against_its_constructor_when_built():
    with pytest.raises(ConfigError, match=r"optimizer.lrr is not a parameter of torch.optim.SGD — did you mean "
                                          r"optimizer.lr\?"):
        build({"_target_": "torch.optim.SGD", "_partial_": True, "lrr": 0.1}, key="optimizer")
    sgd = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1, "name": "sgd"}
    assert callable(build(sgd, key="optimizer"))


# ------------------------------------------------------------------ Trainer pass-through
def test_any_trainer_argument_passes_through_to_lightning(tiny):
    cfg = compose_config("train", tiny + ["+trainer.limit_train_batches=2", "+trainer.num_nodes=1"])
    check_config(cfg, "train")
    trainer_settings = TrainerSettings.from_config(cfg.trainer)
    assert trainer_settings.lightning == {"limit_train_batches": 2, "num_nodes": 1}
    trainer = final_trainer(TrainSettings.from_config(cfg.train), trainer_settings, False, str(ROOT / "runs"))
    assert trainer.limit_train_batches == 2 and trainer.num_nodes == 1 and trainer.max_epochs == 3


def test_fast_dev_run_runs_final_training_and_writes_nothing(tiny):
    cfg = compose_config("train", tiny + ["+trainer.fast_dev_run=1"])
    run = train(cfg)
    assert not run.final_model.exists() and not run.selection.exists()


@pytest.mark.parametrize("override, expect", [
    ("+trainer.fast_dev_rn=1", r"trainer.fast_dev_rn is not a tda setting or an argument of lightning.Trainer "
                               r".*did you mean trainer.fast_dev_run\?"),
    ("+trainer.max_epochs=5", r"trainer.max_epochs is set by tda from train.epochs; set train.epochs instead"),
    ("+trainer.deterministic=false", r"trainer.deterministic is set by tda; remove the override"),
    ("trainer.devices=0", r"trainer.devices=0 must be a positive count"),
])
def test_trainer_typos_and_arguments_tda_sets_are_refused(tiny, override, expect):
    cfg = compose_config("train", tiny + [override])
    with pytest.raises(ConfigError, match=expect):
        train(cfg)
    assert not RunDir.from_config(cfg).path.exists()


# ------------------------------------------------------------------ user errors at the command line
def _run(args: list[str], cwd, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=dict(os.environ, OMP_NUM_THREADS="1", **env),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("script, overrides, expect", [
    ("train.py", ["train.epochs=0"], "train.epochs=0 must be positive; train for at least one epoch"),
    ("train.py", ["train.epochz=3"], "Could not override 'train.epochz'"),  # Hydra's own
    ("attribute.py", ["method=grad_dott"], "Could not find 'method/grad_dott'"),  # Hydra's own
    ("evaluate.py", [], "no final model in"),  # a missing stage output
    ("train.py", ["-m", "train.epochs=1,0"], "train.epochs=0 must be positive"),  # multirun
], ids=["bad-value", "hydra-key", "hydra-option", "missing-final-model", "multirun"])
def test_user_error_is_one_message_and_exit_2(tmp_path, script, overrides, expect):
    proc = _run([str(ROOT / script), *overrides, "logger=none", "trainer.progress_bar=false", "dataset.max_train=96",
                 "dataset.max_test=40"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert expect in proc.stderr and "Traceback" not in proc.stderr
    message = ("\n" + proc.stderr).split("\nError: ", 1)[1]  # a multirun's first job logs before it
    assert expect in message and len(message.splitlines()) <= 25  # Hydra lists the options of a group


@pytest.mark.slow
def test_full_error_shows_the_traceback_and_bugs_always_do(tmp_path):
    proc = _run([str(ROOT / "train.py"), "logger=none", "train.epochs=0"], tmp_path, HYDRA_FULL_ERROR="1")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr
    proc = _run([str(ROOT / "train.py"), "logger=none", "train.epochz=3"], tmp_path, HYDRA_FULL_ERROR="1")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ConfigCompositionException" in proc.stderr
    # a bug (here: a dataset constructor that cannot take the dataset's arguments) keeps its traceback
    proc = _run([str(ROOT / "train.py"), "logger=none", "dataset._target_=builtins.int"], tmp_path)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "TypeError" in proc.stderr


@pytest.mark.slow
def test_console_script_functions_run_the_same_apps(tmp_path):
    """`tda-evaluate` is tda.cli:evaluate (pyproject.toml [project.scripts])."""
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"tda-train": "tda.cli:train", "tda-attribute": "tda.cli:attribute",
                       "tda-evaluate": "tda.cli:evaluate"}
    proc = _run(["-c", "from tda.cli import evaluate; evaluate()", "logger=none"], tmp_path)
    assert proc.returncode == 2 and "no final model in" in proc.stderr and "Traceback" not in proc.stderr
