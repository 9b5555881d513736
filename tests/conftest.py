"""Shared test fixtures: every cache (W&B, Hugging Face, matplotlib) and every run directory
lives in a temporary directory; the tiny settings for in-process runs; cached tiny runs that a test
copies into its own runs folder. Shared helpers are in tests/helpers/ (imported as `helpers.<module>`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from helpers.config import SHARED_DATA, TINY, compose_config
from helpers.runs import BASE, LR

from tda.runs import RunDir
from tda.stages import attribute, train


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


@pytest.fixture
def tiny():
    return list(TINY)


# ------------------------------------------------------------------ cached tiny runs
# Each is computed once per session; a test gets a copy in its own TDA_RUNS_DIR to damage at will.
@pytest.fixture(scope="session")
def _pipeline_cache(tmp_path_factory):
    """One TINY final model with its 2-seed gold standard and Grad-Dot scores, computed once."""
    root = tmp_path_factory.mktemp("pipeline")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TDA_RUNS_DIR", str(root))
        train(compose_config("train", TINY))
        attribute(compose_config("attribute", TINY + ["method=further_training"]))
        attribute(compose_config("attribute", TINY + ["method=grad_dot"]))
    return root


@pytest.fixture
def pipeline(_pipeline_cache, tiny):
    """A copy of the cached run in this test's TDA_RUNS_DIR; returns its RunDir."""
    dest = Path(os.environ["TDA_RUNS_DIR"])
    shutil.copytree(_pipeline_cache, dest, dirs_exist_ok=True)
    return RunDir.from_config(compose_config("train", tiny))


@pytest.fixture(scope="session")
def _runs_cache(tmp_path_factory):
    """One tiny final model (helpers.runs.BASE) with its 3-seed gold standard (whole, and with
    another lr in two parts) and Grad-Dot scores, and a second final model (OTHER: train.epochs=4)
    with the same, computed once."""
    root = tmp_path_factory.mktemp("faults")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TDA_RUNS_DIR", str(root))
        for extra in ([], ["train.epochs=4"]):
            o = BASE + extra
            train(compose_config("train", o))
            for method in ("further_training", "grad_dot"):
                attribute(compose_config("attribute", o + [f"method={method}"]))
        for index in (0, 1):  # the same gold standard in two parts, with another lr (another key)
            attribute(compose_config("attribute", BASE + ["method=further_training", *LR,
                                                          f"further_training.left_out_shard.index={index}",
                                                          "further_training.left_out_shard.count=2"]))
    return root


@pytest.fixture
def runs(_runs_cache):
    """A copy of the cached runs in this test's TDA_RUNS_DIR; returns that folder."""
    dest = Path(os.environ["TDA_RUNS_DIR"])
    shutil.copytree(_runs_cache, dest, dirs_exist_ok=True)
    return dest
