"""The gold standard as its own stage (issue 15): `tda.stages.further_train` with its own entry
config, reached unchanged through the alias `attribute.py method=further_training`; the job that
writes it apart from the store that reads it; one progress bar per job with Lightning's per-group
output silenced; the gold-standard key computed once per evaluation."""

from __future__ import annotations

import ast
import dataclasses
import logging
from pathlib import Path

import torch
from conftest import CONF, ROOT, compose_config
from omegaconf import OmegaConf

from tda.artifacts import load_tensors
from tda.evaluation import evaluate as evaluate_module
from tda.further_training.gold_standard import FurtherTraining
from tda.further_training.store import further_training_key, is_sharded, job_files, load_gold_standard, seed_file
from tda.interrupt import describe
from tda.problem import AttributionProblem
from tda.stages import attribute, evaluate, further_train, train
from tda.tracking import wandb_tags


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


def test_attribution_problem_carries_no_further_training_settings():
    fields = {f.name for f in dataclasses.fields(AttributionProblem)}
    assert not fields & {"further_training", "further_optimizer"}


def _problem(n_left_out: int = 5) -> AttributionProblem:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 4, generator=g, dtype=torch.float64), torch.randint(0, 2, (24,), generator=g)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)).double()
    return AttributionProblem(model=model, task="classification", x_train=x, y_train=y, x_test=x[:3], y_test=y[:3],
                              left_out_indices=torch.arange(n_left_out) * 4, test_indices=torch.arange(3))


def test_one_progress_bar_over_seeds_and_groups_and_no_lightning_banners(tmp_path, capfd, caplog):
    cfg = compose_config("further_train", ["further_training.epochs=2", "further_training.batch_size=8",
                                           "further_training.n_seeds=2", "further_training.max_runs_per_group=2",
                                           "further_training.progress_bar=true"])
    with caplog.at_level(logging.INFO):
        seeds = FurtherTraining(cfg.further_training, cfg.further_optimizer, cfg.trainer).run(_problem(), tmp_path)
    assert seeds == [0, 1]
    err = capfd.readouterr().err
    # 6 runs (the full run and 5 left out) in groups of 2: 3 groups per seed
    for seed in (1, 2):
        for group in (1, 2, 3):
            assert f"seed {seed}/2 · group {group}/3" in err
    assert "6/6" in err
    for noise in ("GPU available", "TPU available", "litlogger", "`Trainer.fit` stopped", "LeafSpec", "Epoch 1"):
        assert noise not in err
        assert not any(noise in r.getMessage() for r in caplog.records)


def test_progress_bar_off_prints_nothing(tmp_path, capfd):
    cfg = compose_config("further_train", ["further_training.epochs=1", "further_training.batch_size=8",
                                           "further_training.n_seeds=1", "trainer.progress_bar=false"])
    FurtherTraining(cfg.further_training, cfg.further_optimizer, cfg.trainer).run(_problem(), tmp_path)
    assert "seed 1/1" not in capfd.readouterr().err


def test_job_files_follow_the_shard_settings(tmp_path):
    cfg = compose_config("further_train", ["further_training.n_seeds=3"])
    assert job_files(cfg.further_training, tmp_path) == [seed_file(tmp_path, s) for s in (0, 1, 2)]
    assert not is_sharded(cfg.further_training)
    cfg = compose_config("further_train", ["further_training.n_seeds=3", "further_training.shard_seeds=[2]",
                                           "further_training.left_out_shard.index=1",
                                           "further_training.left_out_shard.count=2"])
    assert [p.name for p in job_files(cfg.further_training, tmp_path)] == ["seed_00002.part_02_of_02.safetensors"]
    assert is_sharded(cfg.further_training)


def test_interruption_message_names_the_gold_stage(tiny):
    cfg = compose_config("further_train", tiny)
    what, kept, resume = describe("further_train", cfg)
    assert what == "further training" and kept.startswith("0 of 2 seeds are complete in ")
    assert describe("attribute", compose_config("attribute", tiny + ["method=further_training"]))[:2] == (what, kept)


def test_wandb_tags_of_the_gold_stage_name_no_method(tiny):
    tags = wandb_tags(compose_config("further_train", tiny), "further_train")
    assert "stage:further_train" in tags and "further_optimizer:sgd" in tags
    assert not [t for t in tags if t.startswith("method:")]


def test_gold_key_computed_once_per_evaluation(tiny, monkeypatch):
    train(compose_config("train", tiny))
    for method in ("further_training", "grad_dot"):
        attribute(compose_config("attribute", tiny + [f"method={method}"]))
    calls = []

    def counted(cfg):
        calls.append(1)
        return further_training_key(cfg)

    monkeypatch.setattr(evaluate_module, "further_training_key", counted)
    out = evaluate(compose_config("evaluate", tiny))
    assert len(calls) == 1 and out.name == further_training_key(compose_config("evaluate", tiny))
    assert load_gold_standard(out.parent.parent / "gold" / out.name).seeds == [0, 1]


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | \
        {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}


def test_only_the_store_is_used_outside_further_training():
    """runs, tracking and the problem know nothing of further training; everything else outside
    the package finds and reads a gold standard through tda.further_training.store (the stage also
    runs the job; the config checks use its typed settings)."""
    for name in ("runs.py", "tracking.py", "problem.py"):
        assert not [m for m in _imported_modules(ROOT / "tda" / name) if m.startswith("tda.further_training")], name
    for path in sorted((ROOT / "tda").rglob("*.py")):
        if "further_training" in path.parts:
            continue
        used = {m for m in _imported_modules(path) if m.startswith("tda.further_training")}
        allowed = {"tda.further_training.store", "tda.further_training.settings"}  # and its typed settings
        if path.name == "stages.py":
            allowed.add("tda.further_training.gold_standard")
        assert used <= allowed, (path, used - allowed)
