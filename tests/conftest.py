"""Shared test fixtures: every cache (W&B, Hugging Face, matplotlib) and every run directory
lives in a temporary directory; configs are composed exactly as the entry points do."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED_DATA = (ROOT / ".." / "shared" / "data").resolve()


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """Run directories, W&B, HF and matplotlib caches under this test's tmp_path."""
    monkeypatch.setenv("TDA_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))
    if SHARED_DATA.is_dir() and "TDA_DATA_DIR" not in os.environ:
        monkeypatch.setenv("TDA_DATA_DIR", str(SHARED_DATA))
    return tmp_path


def compose_config(config_name: str = "train", overrides: list[str] | None = None) -> DictConfig:
    """The config an entry point would see for these overrides."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides or []))


# Small, fast settings for in-process runs of every stage.
TINY = [
    "dataset.max_train=96", "dataset.max_test=40", "train.epochs=3", "train.batch_size=16",
    "selection.n_left_out=8", "selection.n_test=6", "further_training.epochs=2",
    "further_training.batch_size=16", "further_training.n_seeds=2", "trainer.progress_bar=false",
    "logger=none",
]


@pytest.fixture
def tiny():
    return list(TINY)


def requires_shared_data(sub: str):
    return pytest.mark.skipif(not (SHARED_DATA / sub).exists(), reason=f"../shared/data/{sub} not present")
