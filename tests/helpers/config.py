"""Where the repository and its configs are, and configs composed exactly as the entry points do."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
SHARED_DATA = (ROOT / ".." / "shared" / "data").resolve()


def compose_config(config_name: str = "train", overrides: list[str] | None = None) -> DictConfig:
    """The config an entry point would see for these overrides."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides or []))


# Small, fast settings for in-process runs of every stage (the `tiny` fixture hands out a copy).
TINY = [
    "dataset.max_train=96", "dataset.max_test=40", "train.epochs=3", "train.batch_size=16",
    "selection.n_left_out=8", "selection.n_test=6", "further_training.epochs=2",
    "further_training.batch_size=16", "further_training.n_seeds=2", "trainer.progress_bar=false",
    "logger=none",
]


def requires_shared_data(sub: str):
    return pytest.mark.skipif(not (SHARED_DATA / sub).exists(), reason=f"../shared/data/{sub} not present")
