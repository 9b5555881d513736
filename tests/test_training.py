"""Final training (tda.training): any Lightning Trainer argument passes through, typos and the
arguments tda sets are refused; the final-training transform applies to training batches only; a
non-finite training loss fails naming the step and writes nothing; a CUDA device asked for without
CUDA is one message."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.config import ROOT, compose_config
from helpers.runs import no_run_dir

from tda.artifacts import load_tensors
from tda.config import ConfigError
from tda.models.base import per_example_loss
from tda.models.mlp import MLP
from tda.preflight import check_config
from tda.runs import RunDir
from tda.stages import attribute, train
from tda.training import TrainerSettings, TrainSettings, final_trainer


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
    assert no_run_dir(cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_requested_without_cuda_is_one_message(tiny):
    cfg = compose_config("train", tiny + ["trainer.accelerator=gpu"])
    with pytest.raises(ConfigError, match=r"trainer.accelerator=gpu asks for a CUDA GPU, but "
                                          r"torch.cuda.is_available\(\) is false .*use trainer.accelerator=cpu"):
        train(cfg)
    assert no_run_dir(cfg)
    run = train(compose_config("train", tiny + ["trainer.attribution_device=cuda"]))  # training does not need it
    assert run.final_model.is_file()
    with pytest.raises(ConfigError, match=r"trainer.attribution_device=cuda asks for a CUDA GPU, but "
                                          r"torch.cuda.is_available\(\) is false .*use trainer.attribution_device=cpu"):
        attribute(compose_config("attribute", tiny + ["trainer.attribution_device=cuda", "method=grad_dot"]))


# ------------------------------------------------------------------ the training loop
def test_final_training_transform_only_on_training_batches():
    from tda.training import FinalModelModule

    seen = []

    def transform(x):
        seen.append(len(x))
        return x + 1.0

    model = MLP([3], 2, hidden=[4])
    module = FinalModelModule(model, lambda p: torch.optim.SGD(p, lr=0.1), "classification", transform=transform)
    module.log = lambda *a, **k: None
    batch = (torch.zeros(5, 3), torch.zeros(5, dtype=torch.long))
    loss = module.training_step(batch, 0)
    expected = per_example_loss(model(batch[0] + 1.0), batch[1], "classification").mean()
    assert seen == [5] and torch.allclose(loss, expected)
    module.validation_step(batch, 0)
    assert seen == [5]


def test_non_finite_training_loss_fails_naming_the_step_and_writes_nothing(tiny):
    cfg = compose_config("train", tiny + ["optimizer.lr=1e12"])
    with pytest.raises(FloatingPointError, match=r"final training diverged: the training loss is (nan|inf) at epoch 0, "
                                                 r"step \d+ .*nothing was written\. Lower optimizer\.lr or set "
                                                 r"train\.gradient_clip_val"):
        train(cfg)
    run = RunDir.from_config(cfg)
    assert not run.final_model.exists() and not run.selection.exists()


# ------------------------------------------------------------------ train.final_checkpoint
@pytest.mark.parametrize("rule, metric", [("best_loss", "loss"), ("best_accuracy", "accuracy")])
def test_best_checkpoint_is_the_model_of_that_epoch(tiny, rule, metric):
    """train.final_checkpoint=best_*: the final model is bitwise the model trained for the chosen
    number of epochs, and its test-split metric is the best over the evaluated epochs."""
    overrides = tiny + ["train.epochs=8", "optimizer.lr=0.5"]
    best = train(compose_config("train", overrides + [f"train.final_checkpoint={rule}"]))
    metrics = json.loads(best.metrics.read_text())
    chosen = metrics["final_checkpoint"]
    assert chosen["rule"] == rule and 1 <= chosen["epoch"] <= 8
    assert chosen[f"test/{metric}"] == pytest.approx(metrics["test"][metric], rel=1e-5)
    shorter = train(compose_config("train", overrides + [f"train.epochs={chosen['epoch']}"]))
    a, b = load_tensors(best.final_model), load_tensors(shorter.final_model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    per_epoch = [json.loads(train(compose_config("train", overrides + [f"train.epochs={e}"])).metrics.read_text())
                 ["test"][metric] for e in range(1, 9)]
    best_value = max(per_epoch) if metric == "accuracy" else min(per_epoch)
    assert metrics["test"][metric] == pytest.approx(best_value, rel=1e-5)
    assert chosen["epoch"] == 1 + per_epoch.index(best_value)


def test_best_accuracy_needs_classes(tmp_path):
    cfg = compose_config("train", ["dataset=diabetes", "model=mlp", "train.epochs=1", "logger=none",
                                   "train.final_checkpoint=best_accuracy", "selection.stratify=false",
                                   "trainer.progress_bar=false"])
    with pytest.raises(ConfigError, match=r"best_accuracy needs classes, but diabetes is a regression dataset"):
        train(cfg)
