"""Issue 6: every experiment config composes and runs train -> attribute (further training and
Grad-Dot) -> evaluate, in-process and offline, at a tiny size: the real local copies in
../shared/data, and a test-written PUMS file for the full Folktables setups."""

from __future__ import annotations

import pytest

from conftest import CONF, SHARED_DATA, compose_config
from tda.artifacts import load_json, load_tensors
from tda.further_training.store import further_training_key
from tda.stages import attribute, evaluate, train
from test_data import write_dictionary, write_pums

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))

# What the tiny runs change beyond TINY, and why.
SMALLER = ["dataset.max_train=48", "train.epochs=1", "further_training.epochs=1", "further_training.n_seeds=1",
           "further_training.checkpoint_every_steps=1"]  # convolutional / transformer runs are slow on 2 cores
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
            sst.further_training.removal, sst.selection.n_left_out, sst.dataset.tokenizer) == \
        (1e-6, 1, 5, "downweight", 50, "bert_base")


@pytest.fixture
def pums_root(tmp_path):
    root = tmp_path / "pums"
    (root / "2018" / "1-Year").mkdir(parents=True)
    write_pums(root / "2018" / "1-Year" / "psam_p25.csv", n=400, seed=1)
    write_dictionary(root / "2018" / "1-Year" / "definition.csv")
    return root


@pytest.mark.parametrize("experiment", [pytest.param(e, marks=pytest.mark.slow) if e in SLOW else e for e in EXPERIMENTS])
def test_experiment_runs_every_stage(experiment, tiny, pums_root):
    if experiment in SHARED and not (SHARED_DATA / SHARED[experiment]).exists():
        pytest.skip(f"../shared/data/{SHARED[experiment]} not present")
    over = [f"experiment={experiment}", *tiny, *EXTRA.get(experiment, [])]
    if experiment.startswith("folktables") and not experiment.endswith("_cpu"):
        over.append(f"dataset.root={pums_root}")
    cfg = compose_config("train", over)
    run = train(cfg)
    metrics = load_json(run.metrics)
    assert metrics["n_train"] <= 96 and 0.0 <= metrics["test"]["accuracy"] <= 1.0
    for method in ("further_training", "grad_dot"):
        attribute(compose_config("attribute", over + [f"method={method}"]))
    gold = load_tensors(run.gold_dir(further_training_key(compose_config("attribute", over))) / "seed_00000.safetensors")
    assert gold["diff"].shape[1:] == (6, 8)
    out = evaluate(compose_config("evaluate", over))
    assert (out / "similarity.csv").is_file()
