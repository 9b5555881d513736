"""The names on disk do not move: run, gold-standard and method keys of a handful of configs, and the
directory of a comparison, equal those the code computed before the typed sections derived them
(recorded from main 9916fbd, when runs.py and store.py hashed the raw config nodes). A key that
changed would orphan every run directory and gold standard computed before it."""

from __future__ import annotations

import dataclasses

import pytest
from helpers.config import compose_config

from tda.config import to_container
from tda.evaluation.settings import EvaluateSettings
from tda.further_training.store import GoldStandardSpec
from tda.preflight import check_config
from tda.runs import RunDir, method_key

KEYS = [
    ([], "breast_cancer-mlp-sgd-c05ec9e5", "sgd-1122fb1a", "grad_dot-58e852df"),
    (["gold_standard=retraining"], "breast_cancer-mlp-sgd-c05ec9e5", "sgd-5cc6133b", "grad_dot-58e852df"),
    (["further_training.estimator=derivative", "further_training.removal=mask"],
     "breast_cancer-mlp-sgd-c05ec9e5", "sgd-fbdbefee", "grad_dot-58e852df"),
    (["further_training.estimator=derivative", "further_training.removal=downweight", "further_training.epsilon=0.01",
      "further_training.derivative_mode=reverse"], "breast_cancer-mlp-sgd-c05ec9e5", "sgd-f01e460a",
     "grad_dot-58e852df"),
    (["further_training.checkpoint_every_steps=5", "further_training.checkpoint_first_step=2",
      "further_training.checkpoint_last_step=true"], "breast_cancer-mlp-sgd-c05ec9e5", "sgd-7b2bec44",
     "grad_dot-58e852df"),
    # how and which part a job computes leave the key alone
    (["further_training.shard_seeds=[1]", "further_training.left_out_shard.index=1",
      "further_training.left_out_shard.count=2", "further_training.engine=reference"],
     "breast_cancer-mlp-sgd-c05ec9e5", "sgd-1122fb1a", "grad_dot-58e852df"),
    (["further_optimizer=adam", "further_training.batchnorm_momentum=0", "further_training.n_seeds=7"],
     "breast_cancer-mlp-sgd-c05ec9e5", "adam-d50212d9", "grad_dot-58e852df"),
    (["train.final_checkpoint=best_loss", "selection.left_out_every=3", "train.overwrite=true"],
     "breast_cancer-mlp-sgd-9f9a1950", "sgd-1122fb1a", "grad_dot-58e852df"),
    (["experiment=folktables_sgd_cpu"], "acs_ma2018-mlp-sgd-6cca5c78", "sgd-3943d799", "grad_dot-58e852df"),
    (["experiment=concrete_cpu", "method=cg"], "concrete-mlp-sgd-94843403", "sgd-1008b22d", "cg-4b57340c"),
    (["dataset=digits", "model=small_cnn", "+trainer.accumulate_grad_batches=2", "method=ekfac"],
     "digits-small_cnn-sgd-e2102829", "sgd-1122fb1a", "ekfac-21b6cf40"),
]


@pytest.mark.parametrize("overrides, run_key, gold_key, method", KEYS)
def test_keys_are_those_of_before(overrides, run_key, gold_key, method, tmp_path, monkeypatch):
    monkeypatch.setenv("TDA_RUNS_DIR", str(tmp_path))
    cfg = compose_config("attribute", overrides)
    settings = check_config(cfg, "attribute")
    assert RunDir.from_config(cfg, settings).key == RunDir.from_config(cfg).key == run_key
    assert GoldStandardSpec.from_config(cfg, settings.further_training).key == gold_key
    assert method_key(cfg) == method


def test_a_left_out_file_keys_the_run_by_its_content(tmp_path):
    listed = tmp_path / "left_out.json"
    listed.write_text("[0, 3, 5, 3]\n")
    cfg = compose_config("train", [f"selection.left_out_file={listed}", "selection.n_left_out=3"])
    assert RunDir.from_config(cfg).key == "breast_cancer-mlp-sgd-e333d2c0"


def test_the_comparison_directory_hashes_the_same_evaluate_settings():
    """evaluate.compare's directory hashes the `evaluate` settings: the typed section holds exactly
    the values of the config node."""
    cfg = compose_config("evaluate", ["evaluate.top_k=[5]", "evaluate.examples.n_test=0"])
    assert dataclasses.asdict(EvaluateSettings.from_config(cfg.evaluate)) == to_container(cfg.evaluate)
