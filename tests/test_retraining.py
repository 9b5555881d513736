"""The retraining gold standard (`gold_standard=retraining`, further_training.start=initial_weights):
train.py records the initial weights; every run starts from them with the final training's
optimizer, epochs, batch size and clipping, and equals the reference engine's plain loop started
there, for a classification and a regression problem; it is a gold standard of its own kind and
key; what cannot repeat the final training is refused with the fix."""

from __future__ import annotations

import shutil
from dataclasses import replace

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from helpers.config import compose_config

from tda.artifacts import IntegrityError, load_tensors, load_tensors_with_metadata, save_tensors
from tda.config import ConfigError, build, to_container
from tda.further_training.reference import further_train_run
from tda.further_training.related import gold_label
from tda.further_training.settings import FurtherTrainingSettings
from tda.further_training.store import further_training_key, load_gold_standard
from tda.preflight import Settings
from tda.provenance import ProvenanceError, read_final_model
from tda.stages import attribute, build_model, evaluate, load_data, select, train
from tda.training import TrainSettings

F64 = torch.float64
SMALL = ["dataset.max_train=40", "dataset.max_test=20", "train.epochs=2", "train.batch_size=16",
         "selection.n_left_out=4", "selection.n_test=5", "further_training.n_seeds=2", "trainer.progress_bar=false",
         "logger=none"]
PROBLEMS = {
    "classification": SMALL + ["train.gradient_clip_val=0.5", "optimizer.lr=0.1"],  # breast cancer, SGD, clipping
    "regression": SMALL + ["dataset=diabetes", "selection.stratify=false", "optimizer=adam", "optimizer.lr=0.01"],
}
RETRAIN = ["gold_standard=retraining", "method=further_training"]


def test_train_writes_the_initial_weights():
    cfg = compose_config("train", PROBLEMS["classification"])
    run = train(cfg)
    initial, header, _ = load_tensors_with_metadata(run.initial_model)
    final = read_final_model(run)
    assert header["identity"] == final.identity
    # the model before training, rebuilt as train.py builds it: same seed, same data and selection first
    settings = Settings.from_config(cfg)
    L.seed_everything(settings.seed, workers=True, verbose=False)
    data = load_data(cfg, settings)
    select(settings.selection, data)
    rebuilt = build_model(cfg, data).state_dict()
    assert initial.keys() == rebuilt.keys() and all(torch.equal(initial[k], rebuilt[k]) for k in rebuilt)
    assert not any(torch.equal(initial[k], final.state_dict[k]) for k in initial)  # training moved every tensor


@pytest.mark.parametrize("task", sorted(PROBLEMS))
def test_retraining_gold_standard_is_the_plain_loop_from_the_initial_weights(task):
    overrides = PROBLEMS[task]
    run = train(compose_config("train", overrides))
    cfg = compose_config("attribute", overrides + RETRAIN)
    gold = load_gold_standard(attribute(cfg))
    # the reference engine's plain loop, started by hand from the recorded initial weights, with the
    # final training's optimizer, epochs, batch size and clipping
    data = load_data(cfg, Settings.from_config(cfg))
    model = build_model(cfg, data)
    model.load_state_dict(load_tensors(run.initial_model))
    model = model.to(F64)
    x, y = data.tensors("train")
    x_test, y_test = data.tensors("test")
    test = torch.tensor(gold.meta["test_indices"])
    if task == "regression":
        y, y_test = y.to(F64), y_test.to(F64)
    kw = dict(optimizer=build(cfg.optimizer), x=x.to(F64), y=y, x_test=x_test[test].to(F64), y_test=y_test[test],
              task=task, n_epochs=2, batch_size=16, removal="drop", clip_grad_norm=cfg.train.gradient_clip_val)
    assert data.task == task and gold.seeds == [0, 1] and gold.diff.shape == (2, 5, 4, 2)
    for i, seed in enumerate(gold.seeds):
        full = further_train_run(model, seed=seed, left_out=None, **kw)
        diff = torch.stack([further_train_run(model, seed=seed, left_out=j, **kw) - full
                            for j in gold.meta["left_out_indices"]], dim=-1)
        assert float((gold.full_loss[..., i] - full).abs().max()) < 1e-10
        assert float((gold.diff[..., i] - diff).abs().max()) < 1e-10
    assert float(gold.diff.abs().max()) > 1e-5
    assert float(gold.full_loss[-1].mean()) < float(gold.initial_loss.mean())  # retraining trains
    # the reference engine writes the same numbers into the same directory
    shutil.rmtree(attribute(cfg))
    ref = load_gold_standard(attribute(compose_config("attribute", overrides + RETRAIN +
                                                      ["further_training.engine=reference"])))
    assert float((ref.diff - gold.diff).abs().max()) < 1e-10
    assert float((ref.distance_from_start - gold.distance_from_start).abs().max()) < 1e-10


def test_retraining_is_a_gold_standard_of_its_own_kind():
    overrides = PROBLEMS["classification"]
    train(compose_config("train", overrides))
    cfg, plain = compose_config("attribute", overrides + RETRAIN), compose_config("attribute", overrides)
    assert further_training_key(cfg) != further_training_key(plain)
    gold = load_gold_standard(attribute(cfg))
    settings = gold.meta["further_training"]
    assert (settings["start"], settings["epochs"], settings["batch_size"], settings["clip_grad_norm"]) == \
        ("initial_weights", 2, 16, 0.5)
    assert gold.meta["further_optimizer"] == to_container(cfg.optimizer)  # the final training's, resolved
    assert gold.kind == "retraining" and gold_label(settings) == "retraining: difference (drop)"
    further = load_gold_standard(attribute(compose_config("attribute", overrides + ["method=further_training"])))
    assert further.kind == "further training" and gold_label(further.meta["further_training"]) == "difference (drop)"


def test_retraining_refuses_what_cannot_repeat_the_final_training():
    overrides = PROBLEMS["classification"]
    run = train(compose_config("train", overrides))
    for override, message in (
            ("further_training.epochs=1", r"further_training.epochs=1 differs from the final training's "
                                          r"train.epochs=2; gold_standard=retraining sets it from the final training"),
            ("further_training.batch_size=8", r"further_training.batch_size=8 differs from the final training's "
                                              r"train.batch_size=16"),
            ("further_training.clip_grad_norm=null", r"further_training.clip_grad_norm=None differs from the final "
                                                     r"training's train.gradient_clip_val=0.5")):
        with pytest.raises(ConfigError, match=r"gold_standard=retraining\) cannot repeat the final training:\n"
                                              r"  - " + message):
            attribute(compose_config("attribute", overrides + RETRAIN + [override]))
    settings = FurtherTrainingSettings(start="initial_weights", epochs=2, batch_size=16)
    train_node = TrainSettings(epochs=2, batch_size=16)
    sgd, adam = {"_target_": "torch.optim.SGD", "lr": 0.1}, {"_target_": "torch.optim.Adam", "lr": 0.1}
    assert settings.retraining_problems(train_node, sgd, sgd) == []
    assert settings.retraining_problems(train_node, sgd, adam) == [
        f"further_optimizer {adam} differs from the final training's optimizer {sgd}; gold_standard=retraining sets "
        f"it from the final training; remove its override"]
    assert settings.retraining_problems(replace(train_node, final_checkpoint="best_loss"), sgd, sgd, "cifar10") == [
        "train.final_checkpoint=best_loss: the final model is the best checkpoint of its training, not the end of a "
        "schedule that could be repeated; retrain with train.final_checkpoint=last for the retraining gold standard",
        "dataset cifar10 augments its inputs in final training, which the runs of a gold standard never do; turn the "
        "augmentation off in the dataset config (and retrain) to retrain from the initial weights"]
    cfg = compose_config("attribute", overrides + RETRAIN)
    # initial weights of another final model, damaged ones, none
    initial, header, _ = load_tensors_with_metadata(run.initial_model)
    save_tensors(run.initial_model, initial, metadata={"identity": header["identity"] | {"weights": "0" * 64}})
    with pytest.raises(ProvenanceError, match=r"(?s)initial weights .* identity: weights: artifact has '0+'.*"
                                              r"They belong to another final model"):
        attribute(cfg)
    run.initial_model.write_bytes(run.initial_model.read_bytes()[:-8])
    with pytest.raises(IntegrityError, match=r"initial weights .* are damaged or truncated"):
        attribute(cfg)
    run.initial_model.unlink()
    with pytest.raises(FileNotFoundError, match=r"trained before initial weights were recorded \(no "
                                                r"initial_model.safetensors\); re-run `python train.py <same "
                                                r"overrides> train.overwrite=true`"):
        attribute(cfg)
    assert not (run.path / "gold").exists()  # nothing was computed


def test_evaluate_sets_further_training_against_retraining():
    """evaluate.py gold_standard=retraining: every method against the retrained models, and each
    further-training gold standard of the same final model against the retraining gold standard's
    last checkpoint (the paper's Figure 11), equal to a direct computation."""
    overrides = PROBLEMS["regression"]
    train(compose_config("train", overrides))
    further = load_gold_standard(attribute(compose_config("attribute", overrides + ["method=further_training"])))
    retraining = load_gold_standard(attribute(compose_config("attribute", overrides + RETRAIN)))
    attribute(compose_config("attribute", overrides + ["method=grad_dot"]))
    out = evaluate(compose_config("evaluate", overrides + ["gold_standard=retraining"]))
    vs = pd.read_csv(out / "further_vs_retraining.csv")
    assert vs["method"].str.startswith("difference (drop) sgd-").all()
    target = retraining.attribution(center=True)[-1].numpy()  # [n_test, n_left_out]: the retrained models
    for t, a in enumerate(further.attribution(center=True).numpy()):
        cos = [float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v))) for u, v in zip(a, target)]
        row = vs[(vs.metric == "cosine") & vs.centered & (vs.checkpoint == t)]
        assert row["mean"].item() == pytest.approx(np.mean(cos), abs=1e-12)
    assert "## Further training vs retraining" in (out / "report.md").read_text()
