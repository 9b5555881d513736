"""Provenance (tda.provenance): artifacts that do not belong together are never combined. Final
models, method scores, gold standards, seed files and parts copied from another run, another final
model or other settings are refused, naming what differs; retraining to other weights supersedes
every dependent result and never mixes old and new seeds; every artifact records what produced it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers.config import compose_config
from helpers.runs import BASE, LR, OTHER, gold_dir_of, method_dir_of, run_of

from tda.artifacts import IntegrityError, load_json, save_json
from tda.further_training.store import further_training_key, load_gold_standard, seed_file
from tda.provenance import ProvenanceError, code_version
from tda.stages import attribute, evaluate, train


# ------------------------------------------------------------------ what an artifact records
def test_artifacts_carry_provenance(tiny, pipeline):
    run = pipeline
    sel = load_json(run.selection)
    prov = sel["provenance"]
    assert prov["code_version"] == code_version()
    assert prov["code_version"]["git_commit"] or prov["code_version"]["package_version"]
    assert prov["config"]["selection"]["n_left_out"] == 8 and prov["n_train"] == 96
    out = attribute(compose_config("attribute", tiny + ["method=grad_dot"]))
    record = load_json(out / "record.json")
    assert record["shape"] == [6, 8]
    assert record["left_out_indices"] == sel["left_out_indices"] and record["test_indices"] == sel["test_indices"]
    from tda.artifacts import load_tensor_metadata

    assert load_tensor_metadata(run.final_model)["code_version"] == code_version()


# ------------------------------------------------------------------ retraining
def test_retraining_to_other_weights_supersedes_every_dependent_result(runs):
    run = run_of(BASE)
    gold_before = load_gold_standard(gold_dir_of(BASE)).diff
    train(compose_config("train", BASE + ["train.overwrite=true"]))  # deterministic: the same weights again
    assert (run.path / "gold").is_dir() and not (run.path / "superseded").exists()  # all results kept
    assert torch.equal(load_gold_standard(gold_dir_of(BASE)).diff, gold_before)
    # a final model with other weights in the directory (stands in for a retrain on other hardware)
    shutil.copy(run_of(OTHER).final_model, run.final_model)
    with pytest.raises(ProvenanceError, match="run: artifact has"):  # its own header gives it away
        train(compose_config("train", BASE))
    train(compose_config("train", BASE + ["train.overwrite=true"]))  # the fix the message gives
    moved = list((run.path / "superseded").iterdir())
    assert len(moved) == 1 and {"gold", "methods"} <= {p.name for p in moved[0].iterdir()}
    assert not (run.path / "gold").exists() and not (run.path / "methods").exists()
    attribute(compose_config("attribute", BASE + ["method=further_training"]))  # recomputed for the new model
    assert torch.equal(load_gold_standard(gold_dir_of(BASE)).diff, gold_before)  # (which has BASE's weights again)


def test_new_seed_after_retraining_never_mixes_with_old_seeds(runs):
    run = run_of(BASE)
    gold_dir = gold_dir_of(BASE)
    seed_file(gold_dir, 2).unlink()
    # the run directory's final model is replaced by another one with a valid header of its own
    shutil.copy(run_of(OTHER).final_model, run.final_model)
    with pytest.raises(ProvenanceError, match="refusing to combine the final model"):
        attribute(compose_config("attribute", BASE + ["method=further_training"]))
    assert not seed_file(gold_dir, 2).exists()


# ------------------------------------------------------------------ copies from elsewhere
def test_final_model_from_another_config_is_refused(tiny):
    other = train(compose_config("train", tiny + ["model.hidden=[16]"]))
    run = train(compose_config("train", tiny))
    shutil.copy(other.final_model, run.final_model)  # e.g. a hand-copied file
    with pytest.raises(ProvenanceError, match="(?s)refusing to combine the final model.*run: artifact has"):
        attribute(compose_config("attribute", tiny + ["method=grad_dot"]))


def test_final_model_copied_from_another_run_is_refused(runs):
    shutil.copy(run_of(OTHER).final_model, run_of(BASE).final_model)
    for stage, extra in (("attribute", ["method=grad_dot"]), ("evaluate", []), ("train", [])):
        with pytest.raises(ProvenanceError, match=r"(?s)refusing to combine the final model.*run: artifact has"):
            {"attribute": attribute, "evaluate": evaluate, "train": train}[stage](compose_config(stage, BASE + extra))


def test_method_scores_copied_from_another_final_model_are_refused(runs):
    mine, other = method_dir_of(BASE), method_dir_of(OTHER)
    assert mine.name == other.name  # same method settings: same directory name in both runs
    shutil.rmtree(mine)
    shutil.copytree(other, mine)
    with pytest.raises(ProvenanceError, match=r"(?s)refusing to combine the scores in .*final_model: "
                                              r".*weights: artifact has"):
        attribute(compose_config("attribute", BASE + ["method=grad_dot"]))
    with pytest.raises(ProvenanceError, match=r"(?s)refusing to combine the scores in .*final_model: "
                                              r".*weights: artifact has"):
        evaluate(compose_config("evaluate", BASE))


def test_cached_scores_for_other_instances_are_refused(tiny, pipeline):
    cfg = compose_config("attribute", tiny + ["method=grad_dot"])
    out = pipeline.method_dir(cfg)
    other = tiny + ["method=grad_dot", "selection.seed=1"]  # another selection of left-out instances
    train(compose_config("train", other))
    shutil.rmtree(out)
    shutil.copytree(attribute(compose_config("attribute", other)), out)
    with pytest.raises(ProvenanceError, match=r"(?s)refusing to combine the scores in .*final_model: "
                                              r".*selection.*Delete"):
        attribute(cfg)


def test_record_of_another_method_beside_the_scores_is_refused(runs):
    shutil.copy(method_dir_of(OTHER) / "record.json", method_dir_of(BASE) / "record.json")
    with pytest.raises(ProvenanceError, match=r"record.json does not describe .*scores.safetensors"):
        evaluate(compose_config("evaluate", BASE))


def test_gold_standard_copied_from_another_final_model_is_refused(runs):
    mine, other = gold_dir_of(BASE), gold_dir_of(OTHER)
    assert mine.name == other.name
    shutil.rmtree(mine)
    shutil.copytree(other, mine)
    with pytest.raises(ProvenanceError, match=r"(?s)refusing to combine the gold standard .*final_model: "
                                              r".*weights: artifact has"):
        evaluate(compose_config("evaluate", BASE))
    with pytest.raises(ProvenanceError, match=r"(?s)refusing to combine the gold standard .*final_model: "
                                              r".*weights: artifact has"):
        attribute(compose_config("attribute", BASE + ["method=further_training"]))


def test_gold_standard_from_other_settings_is_refused(tiny, pipeline):
    gold_dir = pipeline.gold_dir(further_training_key(compose_config("attribute", tiny)))
    meta = json.loads((gold_dir / "meta.json").read_text())
    meta["further_optimizer"]["lr"] = 0.5  # e.g. a directory copied from another experiment
    save_json(gold_dir / "meta.json", meta)
    with pytest.raises(ProvenanceError, match=r"(?s)refusing to combine the gold standard.*further_optimizer"):
        evaluate(compose_config("evaluate", tiny))


def test_seed_file_copied_from_another_final_model_is_refused(runs):
    shutil.copy(seed_file(gold_dir_of(OTHER), 1), seed_file(gold_dir_of(BASE), 1))
    with pytest.raises(ProvenanceError, match=r"(?s)gold-standard file .*seed_00001.safetensors.*final_model"):
        evaluate(compose_config("evaluate", BASE))
    with pytest.raises(ProvenanceError, match=r"(?s)gold-standard file .*seed_00001.safetensors"):
        attribute(compose_config("attribute", BASE + ["method=further_training"]))  # not "already there"


def test_seed_copied_as_another_seed_is_refused(runs):
    gold_dir = gold_dir_of(BASE)
    shutil.copy(seed_file(gold_dir, 0), seed_file(gold_dir, 2))
    with pytest.raises(ProvenanceError, match=r"(?s)seed_00002.safetensors \(its header names another seed.*seed: "
                                              r"artifact has 0, this run needs 2"):
        evaluate(compose_config("evaluate", BASE))


def test_seed_copied_from_a_gold_standard_with_other_settings_is_refused(runs):
    lr_dir = gold_dir_of(BASE + LR)
    whole = seed_file(gold_dir_of(BASE), 1)
    # the lr 1e-3 gold standard exists only in parts: take its first part under the whole seed's name
    shutil.copy(seed_file(lr_dir, 1, (0, 2)), whole)
    with pytest.raises(ProvenanceError, match=r"(?s)seed_00001.safetensors.*further_optimizer: lr: artifact has 0.001"):
        evaluate(compose_config("evaluate", BASE))


def test_part_copied_over_another_part_is_refused(runs):
    lr_dir = gold_dir_of(BASE + LR)
    assert torch.isfinite(load_gold_standard(lr_dir).diff).all()  # the two parts merge
    shutil.copy(seed_file(lr_dir, 0, (0, 2)), seed_file(lr_dir, 0, (1, 2)))
    with pytest.raises(ProvenanceError, match=r"(?s)part_02_of_02.safetensors \(its header names another seed or part"):
        evaluate(compose_config("evaluate", BASE + LR))


def test_meta_json_edited_by_hand_is_refused(runs):
    meta_path = gold_dir_of(BASE) / "meta.json"
    text = meta_path.read_text()
    meta_path.write_text(text.replace('"seeds": [\n    0,\n    1,\n    2\n  ]', '"seeds": [\n    0,\n    1\n  ]'))
    assert meta_path.read_text() != text
    with pytest.raises(IntegrityError, match=r"meta.json was changed after it was written"):
        evaluate(compose_config("evaluate", BASE))
    # a key deleted and the checksum recomputed (another tool's write): the missing field is an error
    meta = load_json(meta_path, verify=False)
    meta.pop("_sha256"), meta.pop("final_model")
    save_json(meta_path, meta)
    with pytest.raises(ProvenanceError, match=r"meta.json does not record \['final_model'\]"):
        evaluate(compose_config("evaluate", BASE))
