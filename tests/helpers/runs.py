"""Run directories of the tests: the configurations of the cached runs (the `runs` and `pipeline`
fixtures in tests/conftest.py), where their final model, gold standard and method scores lie, and
a final model trained in-process."""

from __future__ import annotations

from pathlib import Path

from helpers.config import TINY, compose_config
from tda.further_training.store import further_training_key
from tda.runs import RunDir, runs_root
from tda.stages import train

# The `runs` fixture's final models: BASE and OTHER (another final model, trained one epoch
# longer), each with its 3-seed gold standard and Grad-Dot scores; BASE + LR's gold standard in two
# parts.
BASE = TINY + ["further_training.n_seeds=3"]
OTHER = BASE + ["train.epochs=4"]
LR = ["further_optimizer.lr=1e-3"]


def run_of(overrides) -> RunDir:
    return RunDir.from_config(compose_config("train", overrides))


def gold_dir_of(overrides) -> Path:
    return run_of(overrides).gold_dir(further_training_key(compose_config("attribute", overrides)))


def method_dir_of(overrides, method="grad_dot") -> Path:
    return run_of(overrides).method_dir(compose_config("attribute", overrides + [f"method={method}"]))


def no_run_dir(cfg) -> bool:
    """Nothing was written: paths.runs_dir (the test's own) holds no run directory, only W&B's
    and Hydra's folders (a config too broken to name its run directory can have written none)."""
    root = runs_root(cfg)
    return not root.is_dir() or all(p.name in ("wandb", "_hydra") for p in root.iterdir())


def trained(overrides: list[str]) -> RunDir:
    return train(compose_config("train", overrides))
