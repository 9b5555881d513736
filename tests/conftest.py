"""Shared test fixtures: every cache (W&B, Hugging Face, matplotlib) and every run directory
lives in a temporary directory; the tiny settings for in-process runs; cached tiny runs that a test
copies into its own runs folder. Shared helpers are in tests/helpers/ (imported as `helpers.<module>`).

The README's test command runs the tests in parallel (pytest-xdist, `-n auto`: one worker per
core, at most MAX_WORKERS). Each test gets its own tmp_path, runs folder and caches
(`isolated_env`), whichever worker runs it; the cached runs (`pipeline`, `runs`) are computed once
per session for all workers (helpers.shared.built_once) and copied into the test's runs folder;
torch in each worker uses its share of the cores."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers.config import SHARED_DATA, TINY, compose_config
from helpers.runs import BASE, LR
from helpers.shared import built_once, worker_count

from tda.runs import RunDir
from tda.stages import attribute, train

MAX_WORKERS = 4  # `-n auto` on a larger machine: every worker holds its own torch, data and runs in memory


def pytest_xdist_auto_num_workers(config):
    return max(1, min(os.cpu_count() or 1, MAX_WORKERS))


def pytest_configure(config):
    """Under xdist, torch in each worker (and the processes tests start) gets its share of the
    cores instead of all of them, unless OMP_NUM_THREADS says otherwise."""
    if worker_count() > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // worker_count())
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


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
# Each is computed once per session (for every worker); a test gets a copy in its own TDA_RUNS_DIR
# to damage at will.
def _build_pipeline(root: Path) -> None:
    """One TINY final model with its 2-seed gold standard and Grad-Dot scores."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TDA_RUNS_DIR", str(root))
        train(compose_config("train", TINY))
        attribute(compose_config("attribute", TINY + ["method=further_training"]))
        attribute(compose_config("attribute", TINY + ["method=grad_dot"]))


@pytest.fixture(scope="session")
def _pipeline_cache(tmp_path_factory):
    return built_once(tmp_path_factory, "pipeline", _build_pipeline)


@pytest.fixture
def pipeline(_pipeline_cache, tiny):
    """A copy of the cached run in this test's TDA_RUNS_DIR; returns its RunDir."""
    dest = Path(os.environ["TDA_RUNS_DIR"])
    shutil.copytree(_pipeline_cache, dest, dirs_exist_ok=True)
    return RunDir.from_config(compose_config("train", tiny))


def _build_runs(root: Path) -> None:
    """One tiny final model (helpers.runs.BASE) with its 3-seed gold standard (whole, and with
    another lr in two parts) and Grad-Dot scores, and a second final model (OTHER: train.epochs=4)
    with the same."""
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


@pytest.fixture(scope="session")
def _runs_cache(tmp_path_factory):
    return built_once(tmp_path_factory, "faults", _build_runs)


@pytest.fixture
def runs(_runs_cache):
    """A copy of the cached runs in this test's TDA_RUNS_DIR; returns that folder."""
    dest = Path(os.environ["TDA_RUNS_DIR"])
    shutil.copytree(_runs_cache, dest, dirs_exist_ok=True)
    return dest
