"""An environment that misbehaves: a file-size limit, a run directory that is a file, exhausted
memory each end in one line naming the problem and the fix, with a non-zero exit and nothing
damaged written (real processes, with a real limit); the thread count a final model was trained
with is recorded, and a retraining that cannot reproduce it says why."""

from __future__ import annotations

import errno
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.config import ROOT, TINY

from tda.artifacts import load_json, load_tensor_metadata
from tda.exits import USER_ERROR_EXIT, environment_problem, exit_code_of

QUIET = ["logger=none", "trainer.progress_bar=false"]
# the default config (455 training rows: sums large enough to be split over threads), shorter
THREADED = QUIET + ["train.epochs=10"]


def run_train(overrides: list[str], env: dict[str, str], limit_bytes: int | None = None) -> subprocess.CompletedProcess:
    """`python train.py <overrides>` as a real process (with a file-size limit if given)."""
    def limit():  # in the child only: RLIMIT_FSIZE makes a write past it fail with EFBIG
        if limit_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run([sys.executable, "train.py", *overrides], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300, preexec_fn=limit)


def last_line(proc: subprocess.CompletedProcess) -> str:
    return [ln for ln in proc.stderr.splitlines() if ln.strip()][-1]


@pytest.fixture
def env(tmp_path):
    return dict(os.environ, TDA_RUNS_DIR=str(tmp_path / "runs"), WANDB_MODE="offline", OMP_NUM_THREADS="1",
                MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")


@pytest.mark.slow
def test_file_size_limit_is_one_line_and_a_rerun_completes(env, tmp_path):
    proc = run_train(TINY, env, limit_bytes=16 * 1024)  # the model files are larger than 16 KiB
    assert proc.returncode == USER_ERROR_EXIT, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    line = last_line(proc)
    assert line.startswith("Error: ") and "would exceed the file-size limit" in line
    assert "ulimit -f unlimited" in line and ".safetensors" in line
    assert not list((tmp_path / "runs").glob("*/final_model.safetensors"))  # no model, no partial file
    assert not list((tmp_path / "runs").glob("*/*.tmp*"))
    done = run_train(TINY, env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((tmp_path / "runs").glob("*/final_model.safetensors"))) == 1


@pytest.mark.slow
def test_run_directory_that_is_a_file(env, tmp_path):
    (tmp_path / "runs").write_text("not a directory")
    proc = run_train(TINY, env)
    assert proc.returncode == USER_ERROR_EXIT and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = last_line(proc)
    assert str(tmp_path / "runs") in line and "is a file where tda needs a directory" in line
    assert "remove or rename it" in line


def test_environment_errors_name_the_problem_and_the_fix():
    full = OSError(errno.ENOSPC, "No space left on device", "/runs/x/seed_00001.safetensors")
    assert environment_problem(full).startswith("the disk is full writing /runs/x/seed_00001.safetensors: free space")
    assert "re-run the command after the fix" in environment_problem(full)
    assert exit_code_of(full) == USER_ERROR_EXIT
    assert "read-only file system" in environment_problem(OSError(errno.EROFS, "Read-only file system", "/r"))
    assert "is a directory where tda writes a file" in environment_problem(IsADirectoryError(errno.EISDIR, "x", "/l"))
    assert "lower attribution.memory_budget_mb" in environment_problem(MemoryError())
    # anything else is a bug: no one-line message, exit 1 with its traceback
    assert environment_problem(OSError(errno.ECONNREFUSED, "Connection refused")) is None
    assert exit_code_of(ValueError("bug")) == 1


def final_model(runs: Path) -> dict:
    (model,) = runs.glob("*/final_model.safetensors")
    return load_tensor_metadata(model)


@pytest.mark.slow
def test_thread_count_is_recorded_and_a_retraining_says_why_it_differs(env, tmp_path):
    """Final training's float32 sums depend on torch's thread count (split over more threads,
    they round differently): the count is recorded; the same count reproduces the model bit for
    bit; a retraining under another count that changes the last bits says so and how to
    reproduce the old model."""
    runs = tmp_path / "runs"
    first = run_train(THREADED, env)
    assert first.returncode == 0, first.stderr[-3000:]
    header = final_model(runs)
    assert header["environment"]["threads"] == 1
    (selection,) = runs.glob("*/selection.json")
    assert load_json(selection)["provenance"]["environment"]["threads"] == 1

    two = run_train(THREADED + ["train.overwrite=true"], dict(env, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert final_model(runs)["environment"]["threads"] == 2
    if final_model(runs)["identity"]["weights"] != header["identity"]["weights"]:
        assert "differs from the one it replaces in its last bits (threads 1 then, 2 now)" in two.stdout
        assert "run with OMP_NUM_THREADS=1 to reproduce it bit for bit" in two.stdout
    else:  # this machine's kernels happen not to split these sums: nothing to say
        assert "differs from the one it replaces" not in two.stdout

    again = run_train(THREADED + ["train.overwrite=true"], env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert final_model(runs)["identity"]["weights"] == header["identity"]["weights"]
