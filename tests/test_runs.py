"""Run directories (tda.runs): the run key covers the trainer arguments that change training and
no others; every name from the config that becomes a path component is checked before anything is
written, and a RunDir hands out only paths inside it."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.config import compose_config
from helpers.evaluation import COMPARE
from helpers.runs import run_of

from tda.config import ConfigError
from tda.runs import RunDir
from tda.stages import attribute, evaluate, train


def test_trainer_arguments_that_change_training_are_part_of_the_run(tiny):
    base = run_of(tiny).path.name
    assert run_of(tiny + ["+trainer.accumulate_grad_batches=2"]).path.name != base
    assert run_of(tiny + ["+trainer.limit_train_batches=3"]).path.name != base
    for display_only in ("+trainer.enable_model_summary=true", "+trainer.log_every_n_steps=5", "trainer.devices=1"):
        assert run_of(tiny + [display_only]).path.name == base, display_only


# ------------------------------------------------------------------ names that would leave runs/
UNSAFE = [
    ("train", "dataset.name=../../x", "dataset.name", "'../../x'"),
    ("train", "model.name=..", "model.name", "'..'"),
    ("train", "optimizer.name=a/b", "optimizer.name", "'a/b'"),
    ("train", "name=", "name", "''"),
    ("train", "name=grp/../../up", "name", "'grp/../../up'"),
    ("attribute", "method.name=/abs", "method.name", "'/abs'"),
    ("attribute", "further_optimizer.name=../../../escape", "further_optimizer.name", "'../../../escape'"),
    ("attribute", "method.name=.hidden", "method.name", "'.hidden'"),
    ("evaluate", "name=../../x", "name", "'../../x'"),  # compare mode: `name` names runs/compare/<name>-<hash>
]


@pytest.mark.parametrize("stage,override,key,shown", UNSAFE, ids=[u[1] for u in UNSAFE])
def test_unsafe_name_is_refused_before_anything_is_written(tiny, tmp_path, stage, override, key, shown):
    extra = COMPARE if stage == "evaluate" else []
    cfg = compose_config(stage, tiny + [override] + extra)
    before_parent = set(tmp_path.parent.iterdir())
    run_stage = {"train": train, "attribute": attribute, "evaluate": evaluate}[stage]
    with pytest.raises(ConfigError) as err:
        run_stage(cfg)
    msg = str(err.value)
    assert f"{key}={shown}" in msg and "paths.runs_dir" in msg
    assert f"set {key} to a name of letters, digits and . _ - + = , ( ) only" in msg
    assert not (tmp_path / "runs").exists()  # nothing inside paths.runs_dir ...
    assert set(tmp_path.parent.iterdir()) == before_parent  # ... nor beside it
    assert not Path("/abs").exists() and not list(Path("/").glob("abs-*"))


def test_run_dir_hands_out_only_paths_inside_it(tmp_path):
    run = RunDir(tmp_path / "runs" / "r")
    with pytest.raises(ValueError, match="cannot name a directory"):
        run.eval_dir("../../elsewhere")
    assert run.eval_dir("sgd-1234abcd") == tmp_path / "runs" / "r" / "eval" / "sgd-1234abcd"
