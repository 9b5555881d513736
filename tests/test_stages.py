"""The stages (tda.stages) end to end, in-process and offline: train -> further_train (also through
its alias `attribute.py method=further_training`) -> attribute -> evaluate on the embedded default,
the same numbers for the same config, a clear error for a missing final model; and every experiment
config at a tiny size (the real local copies in ../shared/data, and a test-written PUMS file for the
full Folktables setups)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.config import CONF, SHARED_DATA, compose_config
from helpers.data import write_concrete, write_dictionary, write_energy, write_heloc, write_pums
from omegaconf import OmegaConf

from tda.artifacts import load_json, load_tensors
from tda.config import build
from tda.further_training.store import further_training_key
from tda.stages import attribute, evaluate, further_train, train


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


def test_missing_final_model_is_a_clear_error(tiny):
    with pytest.raises(FileNotFoundError, match="python train.py"):
        attribute(compose_config("attribute", tiny + ["method=grad_dot"]))


def test_missing_final_model(tiny):
    for stage, fn in (("attribute", attribute), ("evaluate", evaluate)):
        with pytest.raises(FileNotFoundError, match="no final model.*python train.py"):
            fn(compose_config(stage, tiny))


# ------------------------------------------------------------------ the gold-standard stage
def test_the_stage_and_its_alias_write_the_same_gold_standard(tiny, tmp_path, monkeypatch):
    run = train(compose_config("train", tiny))
    cfg = compose_config("further_train", tiny)
    assert "method" not in cfg  # the gold standard has no method
    out = further_train(cfg)
    assert out == run.gold_dir(further_training_key(cfg))
    stage = {p.name: load_tensors(p) for p in out.glob("seed_*.safetensors")}
    assert sorted(stage) == ["seed_00000.safetensors", "seed_00001.safetensors"]

    monkeypatch.setenv("TDA_RUNS_DIR", str(tmp_path / "alias"))
    train(compose_config("train", tiny))
    alias_cfg = compose_config("attribute", tiny + ["method=further_training"])
    alias = attribute(alias_cfg)
    assert alias.name == out.name == further_training_key(alias_cfg)
    for name, tensors in stage.items():
        other = load_tensors(alias / name)
        assert all(torch.equal(tensors[k], other[k]) for k in ("diff", "full_loss", "initial_loss")), name


def test_the_alias_is_declared_not_a_method():
    node = OmegaConf.load(CONF / "method" / "further_training.yaml")
    assert node.stage == "further_train" and "_target_" not in node
    entry = OmegaConf.load(CONF / "further_train.yaml")
    assert "common" in entry.defaults


# ------------------------------------------------------------------ experiments
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


# What the tiny runs change beyond TINY, and why.
SMALLER = ["dataset.max_train=48", "train.epochs=1", "further_training.epochs=1", "further_training.n_seeds=1",
           "further_training.checkpoint_every_steps=1", "further_training.checkpoint_first_step=null"]
# (convolutional / transformer runs are slow on 2 cores; the authors' SST-2 schedule starts at step 6)


EXTRA = {
    # bert-base-uncased needs the hub; MiniLM has the same architecture, one layer trainable
    # keeps per-example gradients small while still going through a transformer layer
    "sst2_adamw": ["model.encoder=minilm", "model.trainable=last_k", "model.trainable_k=1",
                   "trainer.accelerator=cpu", "trainer.attribution_device=cpu", *SMALLER],
    "sst2_adamw_cpu": ["further_training.checkpoint_every_steps=3"],
    "cifar10": ["model.width=0.0625", "trainer.accelerator=cpu", "trainer.attribution_device=cpu", *SMALLER],
    "cifar10_cpu": ["model.width=0.0625", *SMALLER],
}


# The GPU-scale configs are covered by their _cpu variants on every quick run.
SLOW = {"cifar10", "sst2_adamw"}


SHARED = {"folktables_sgd_cpu": "acs_ma2018", "folktables_adam_cpu": "acs_ma2018", "sst2_adamw": "sst2",
          "sst2_adamw_cpu": "sst2", "cifar10": "cifar10", "cifar10_cpu": "cifar10"}


def test_every_paper_setup_has_a_config_and_a_cpu_variant():
    for name in ("folktables_sgd", "folktables_adam", "sst2_adamw", "cifar10"):
        assert name in EXPERIMENTS and f"{name}_cpu" in EXPERIMENTS
        assert (CONF / "experiment" / f"{name}.yaml").read_text().startswith("# @package _global_")


def test_paper_hyper_parameters():
    sgd = compose_config("train", ["experiment=folktables_sgd"])
    assert (sgd.dataset.name, sgd.model.hidden, sgd.optimizer.lr, sgd.train.batch_size, sgd.train.epochs) == \
        ("folktables", [128, 128], 0.01, 128, 100)
    assert (sgd.further_optimizer.name, sgd.further_optimizer.lr, sgd.further_training.epochs,
            sgd.further_training.n_seeds, sgd.further_training.removal, sgd.selection.n_left_out) == \
        ("sgd", 1e-4, 25, 100, "drop", 100)
    adam = compose_config("train", ["experiment=folktables_adam"])
    assert (adam.further_optimizer.name, adam.further_optimizer.lr) == ("adam", 1e-6)
    sst = compose_config("train", ["experiment=sst2_adamw"])
    assert (sst.model.encoder, sst.model.trainable, sst.optimizer.lr, sst.train.batch_size, sst.train.epochs,
            sst.train.gradient_clip_val) == ("bert_base", "all", 1e-5, 64, 30, 1.0)
    assert (sst.further_optimizer.lr, sst.further_training.epochs, sst.further_training.checkpoint_every_steps,
            sst.further_training.checkpoint_first_step, sst.further_training.checkpoint_last_step,
            sst.further_training.removal, sst.selection.n_left_out, sst.dataset.tokenizer,
            sst.train.final_checkpoint) == (1e-6, 1, 5, 6, True, "downweight", 50, "bert_base", "best_accuracy")


# Experiments whose data a user supplies (or downloads): a small file written by the test.
WRITTEN = {"concrete": lambda d: write_concrete(d, n=120), "energy": lambda d: write_energy(d, n=120),
           "fico": lambda d: write_heloc(d, n=200)}


@pytest.fixture
def pums_root(tmp_path):
    root = tmp_path / "pums"
    (root / "2018" / "1-Year").mkdir(parents=True)
    write_pums(root / "2018" / "1-Year" / "psam_p25.csv", n=400, seed=1)
    write_dictionary(root / "2018" / "1-Year" / "definition.csv")
    return root


@pytest.mark.parametrize("experiment", [pytest.param(e, marks=pytest.mark.slow) if e in SLOW else e
                                        for e in EXPERIMENTS])
def test_experiment_runs_every_stage(experiment, tiny, pums_root):
    if experiment in SHARED and not (SHARED_DATA / SHARED[experiment]).exists():
        pytest.skip(f"../shared/data/{SHARED[experiment]} not present")
    over = [f"experiment={experiment}", *tiny, *EXTRA.get(experiment, [])]
    if experiment.startswith("folktables") and not experiment.endswith("_cpu"):
        over.append(f"dataset.root={pums_root}")
    dataset = experiment.removesuffix("_cpu")
    if dataset in WRITTEN:
        WRITTEN[dataset](pums_root.parent / dataset)
        over.append(f"dataset.root={pums_root.parent / dataset}")
    cfg = compose_config("train", over)
    run = train(cfg)
    metrics = load_json(run.metrics)
    assert metrics["n_train"] <= 96 and math.isfinite(metrics["test"]["loss"])
    if build(cfg.dataset).task == "classification":
        assert 0.0 <= metrics["test"]["accuracy"] <= 1.0
    else:
        assert "accuracy" not in metrics["test"]
    for method in ("further_training", "grad_dot"):
        attribute(compose_config("attribute", over + [f"method={method}"]))
    gold_dir = run.gold_dir(further_training_key(compose_config("attribute", over)))
    gold = load_tensors(gold_dir / "seed_00000.safetensors")
    assert gold["diff"].shape[1:] == (6, 8)
    out = evaluate(compose_config("evaluate", over))
    assert (out / "similarity.csv").is_file()
