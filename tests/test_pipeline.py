"""Issue 2: the three stages end to end on the embedded default, in-process."""

from __future__ import annotations

import pytest
import torch

from conftest import compose_config
from tda.artifacts import load_json, load_tensors
from tda.further_training.store import further_training_key
from tda.stages import attribute, evaluate, train


def test_every_stage_in_process(tiny):
    cfg = compose_config("train", tiny)
    run = train(cfg)
    metrics = load_json(run.metrics)
    assert metrics["test"]["accuracy"] > 0.7
    sel = load_json(run.selection)
    assert len(sel["left_out_indices"]) == 8 and len(sel["test_indices"]) == 6
    for method in ("further_training", "grad_dot", "grad_cos"):
        attribute(compose_config("attribute", tiny + [f"method={method}"]))
    gold_dir = run.gold_dir(further_training_key(compose_config("attribute", tiny)))
    gold = load_tensors(gold_dir / "seed_00000.safetensors")
    assert gold["diff"].shape == (2, 6, 8) and gold["diff"].dtype == torch.float64
    out = evaluate(compose_config("evaluate", tiny))
    for f in ("similarity.csv", "similarity.png", "report.md"):
        assert (out / f).is_file()


def test_missing_final_model_is_a_clear_error(tiny):
    with pytest.raises(FileNotFoundError, match="python train.py"):
        attribute(compose_config("attribute", tiny + ["method=grad_dot"]))


def test_unknown_method_is_rejected_by_hydra(tiny):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="grad_dott"):
        compose_config("attribute", tiny + ["method=grad_dott"])


def test_typo_in_override_is_rejected(tiny):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="further_trainnig"):
        compose_config("attribute", tiny + ["further_trainnig.epochs=3"])


def test_same_config_same_numbers(tiny, tmp_path, monkeypatch):
    scores = []
    for i in range(2):
        monkeypatch.setenv("TDA_RUNS_DIR", str(tmp_path / f"runs{i}"))
        run = train(compose_config("train", tiny))
        attribute(compose_config("attribute", tiny + ["method=grad_dot"]))
        attribute(compose_config("attribute", tiny + ["method=further_training"]))
        cfg = compose_config("attribute", tiny + ["method=grad_dot"])
        scores.append((load_tensors(run.method_dir(cfg) / "scores.safetensors")["scores"],
                       load_tensors(run.gold_dir(further_training_key(cfg)) / "seed_00001.safetensors")["diff"]))
    assert torch.equal(scores[0][0], scores[1][0])
    assert torch.equal(scores[0][1], scores[1][1])
