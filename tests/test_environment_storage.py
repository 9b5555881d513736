"""Storage that misbehaves, as real processes on real mounts: a complete run read from a
read-only file system (every stage whose work is done exits 0 without a write; evaluate, which
must write, is refused before anything is loaded), a W&B directory that cannot be written
(refused before any work, never W&B's silent fallback to a temporary directory), a disk that
fills up while the gold standard, a method's scores or an evaluation is written, and a lock path
that is a directory (one line, exit 2, nothing damaged written).

Root writes through any permission bits, so read-only storage is a real read-only bind mount
and a full disk a real tmpfs, each inside a user + mount namespace (`unshare -rm`, no privileges
needed); where the machine does not allow one, these tests are skipped with the reason."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.config import ROOT, TINY

from tda.artifacts import load_tensors_with_metadata
from tda.exits import (
    USER_ERROR_EXIT,
    WRITABLE_RUNS_FIX,
    UserError,
    require_writable_directory,
    unwritable_directory,
)
from tda.interrupt import is_multirun

QUIET = [o for o in TINY if o != "logger=none"]  # the W&B logger is chosen per command


@functools.cache
def namespace_problem() -> str | None:
    """Why a read-only bind mount and a tmpfs cannot be made here, or None when they can."""
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=8k tmpfs /mnt && "
                            "mount --bind -o ro /mnt /mnt"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"user + mount namespaces are not available here: {probe.stderr.strip()}"
    return None


needs_mounts = pytest.mark.skipif(namespace_problem() is not None, reason=str(namespace_problem()))


def in_namespace(mount: str, argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """`argv` run after the shell command `mount`, inside a new user + mount namespace (the mount
    is seen by that process alone and vanishes with it)."""
    return subprocess.run(["unshare", "-rm", "sh", "-c", f'{mount} && exec "$@"', "sh", *argv], cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=timeout)


def read_only(path: Path, script: str, overrides: list[str]) -> subprocess.CompletedProcess:
    """`python <script> <overrides>` with `path` bind-mounted read-only over itself."""
    return in_namespace(f"mount --bind -o ro '{path}' '{path}'", [sys.executable, script, *overrides])


def last_line(proc: subprocess.CompletedProcess) -> str:
    return [ln for ln in proc.stderr.splitlines() if ln.strip()][-1]


def refused(proc: subprocess.CompletedProcess) -> str:
    """The one line of a refusal: exit 2, no traceback; returns the line."""
    assert proc.returncode == USER_ERROR_EXIT, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = last_line(proc)
    assert line.startswith("Error: "), proc.stderr[-3000:]
    return line


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under `root`."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
@needs_mounts
def test_a_complete_run_is_read_from_read_only_storage(pipeline, tmp_path):
    runs = pipeline.path.parent
    before = tree(runs)
    elsewhere = [f"hydra.run.dir={tmp_path / 'hydra'}"]  # Hydra's own log and config: a writable place
    gold = read_only(runs, "attribute.py", QUIET + elsewhere + ["logger=none", "method=further_training"])
    assert gold.returncode == 0, gold.stderr[-3000:]
    assert "gold standard complete: 2 seeds" in gold.stdout
    grad_dot = read_only(runs, "attribute.py", QUIET + elsewhere + ["method=grad_dot",
                                                                    f"logger.dir={tmp_path / 'wandb'}"])
    assert grad_dot.returncode == 0, grad_dot.stderr[-3000:]
    assert "scores of grad_dot already in" in grad_dot.stdout
    assert list((tmp_path / "wandb" / "wandb").glob("offline-run-*")), "W&B wrote where logger.dir says"

    # a method not yet computed: refused before it is computed, naming where it would go
    line = refused(read_only(runs, "attribute.py", QUIET + elsewhere + ["logger=none", "method=grad_cos"]))
    assert line.startswith(f"Error: attribute writes the scores of grad_cos into {pipeline.path / 'methods'}/grad_cos-")
    assert "read-only file system" in line and "point TDA_RUNS_DIR at a writable directory" in line
    # evaluate must write eval/: refused before anything is loaded, naming the place and the fix
    evaluate = read_only(runs, "evaluate.py", QUIET + elsewhere + ["logger=none"])
    line = refused(evaluate)
    assert "evaluate: loading" not in evaluate.stdout
    assert f"evaluate writes its tables, figures and report into {pipeline.path / 'eval'}" in line
    assert "read-only file system" in line and "copy the run directory" in line
    # W&B's files under the run tree by default: refused before any work
    line = refused(read_only(runs, "attribute.py", QUIET + elsewhere + ["logger=wandb", "method=grad_dot"]))
    assert line == (f"Error: W&B cannot write its files in logger.dir={runs}: it is on a read-only file system. "
                    f"Give logger.dir a writable directory (logger.dir=<dir>), or run without W&B (logger=none)")
    # Hydra's own output directory (by default under the runs directory): the line names where it goes
    line = refused(read_only(runs, "attribute.py", QUIET + ["logger=none", "method=grad_dot"]))
    assert "is on a read-only file system" in line and "hydra.run.dir=<writable dir>" in line
    assert tree(runs) == before


@pytest.mark.slow
def test_a_w_and_b_directory_that_is_a_file_is_refused_before_any_work(tmp_path):
    (tmp_path / "wandb_file").write_text("not a directory")
    proc = subprocess.run([sys.executable, "train.py", *QUIET, f"logger.dir={tmp_path / 'wandb_file'}/sub"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    line = refused(proc)
    assert f"logger.dir={tmp_path / 'wandb_file' / 'sub'}: {tmp_path / 'wandb_file'}, a part of it, is a file" in line
    assert not list((tmp_path / "runs").glob("*/final_model.safetensors")), "refused before training"


@pytest.mark.slow
@needs_mounts
def test_a_full_disk_while_the_gold_standard_is_written(pipeline, tmp_path):
    """A tmpfs of two pages over the gold directory: meta.json and the first seed fit, the second
    does not (ENOSPC). One line naming the file and the fix; what is there afterwards is whole."""
    overrides = QUIET + ["logger=none", "method=further_training", "further_training.n_seeds=3"]
    gold = pipeline.path / "gold"
    shutil.rmtree(gold)
    gold.mkdir()
    kept = tmp_path / "kept"
    stage = " ".join([sys.executable, "attribute.py", *overrides])
    proc = in_namespace(f"mount -t tmpfs -o size=8k tmpfs '{gold}'",
                        ["sh", "-c", f'{stage}; rc=$?; cp -a "{gold}" "{kept}"; exit $rc'])
    line = refused(proc)
    assert line.startswith("Error: the disk is full writing ") and "free space, or point TDA_RUNS_DIR" in line
    assert ".safetensors" in line
    (key,) = kept.iterdir()
    names = sorted(p.name for p in key.iterdir())
    assert not [n for n in names if n.endswith(".tmp")], names  # no partial file left
    seeds = [n for n in names if n.startswith("seed_")]
    assert len(seeds) < 3
    for name in seeds:  # each file there is complete: its checksum verifies
        load_tensors_with_metadata(key / name)


@pytest.mark.slow
def test_a_lock_path_that_is_a_directory(pipeline):
    """`gold/<key>/.lock` made a directory: the seed still to compute cannot be locked; one line
    naming the path and the fix, the complete seeds untouched; once removed, a re-run finishes."""
    overrides = QUIET + ["logger=none", "method=further_training"]
    (gold,) = (pipeline.path / "gold").iterdir()
    (gold / "seed_00001.safetensors").unlink()
    (gold / ".lock").unlink()
    (gold / ".lock").mkdir()
    before = tree(gold)

    def attribute():
        return subprocess.run([sys.executable, "attribute.py", *overrides], cwd=ROOT, capture_output=True,
                              text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))

    line = refused(attribute())
    assert line.startswith(f"Error: {gold / '.lock'} is a directory where tda writes a file: remove or rename it")
    assert tree(gold) == before
    (gold / ".lock").rmdir()
    done = attribute()
    assert done.returncode == 0 and "gold standard complete: 2 seeds" in done.stdout, done.stderr[-3000:]


@pytest.mark.slow
@needs_mounts
def test_a_full_disk_under_a_method_and_an_evaluation(pipeline):
    """A method's record that does not fit, and an evaluation whose tables and figures do not:
    each one line naming what was being written; no scores file (so nothing counts as complete)
    and no partial evaluation (its staging directory is removed)."""
    methods, evals = pipeline.path / "methods", pipeline.path / "eval"
    evals.mkdir(exist_ok=True)

    def on_tmpfs(where: Path, script: str, overrides: list[str]) -> tuple[str, list[str]]:
        stage = " ".join([sys.executable, script, *QUIET, "logger=none", *overrides])
        proc = in_namespace(f"mount -t tmpfs -o size=4k tmpfs '{where}'",
                            ["sh", "-c", f'{stage}; rc=$?; find "{where}" -mindepth 1 >&2; exit $rc'])
        left = [ln for ln in proc.stderr.splitlines() if ln.startswith(str(where))]
        proc.stderr = "\n".join(ln for ln in proc.stderr.splitlines() if not ln.startswith(str(where)))
        return refused(proc), left

    line, left = on_tmpfs(methods, "attribute.py", ["method=grad_cos"])
    assert line.startswith(f"Error: the disk is full writing {methods}/grad_cos-") and "free space" in line
    assert not [p for p in left if p.endswith(("scores.safetensors", ".tmp"))], left

    line, left = on_tmpfs(evals, "evaluate.py", [])
    assert line.startswith(f"Error: the disk is full writing the evaluation's outputs for {evals}/"), line
    assert left == [], left


def test_what_keeps_a_directory_from_being_written(tmp_path):
    """The reasons named in the refusals above, without a mount: a file in the way (the path, or
    a part of it), or nothing (a directory that can be created)."""
    (tmp_path / "file").write_text("")
    assert unwritable_directory(tmp_path / "file") == f"{tmp_path / 'file'} is a file, not a directory"
    assert unwritable_directory(tmp_path / "file" / "a" / "b") == \
        f"{tmp_path / 'file'}, a part of it, is a file, not a directory"
    assert unwritable_directory(tmp_path / "new" / "deeper") is None
    with pytest.raises(UserError, match=r"^train writes the final model into .*/file, but .* is a file, not a "
                                        r"directory: point TDA_RUNS_DIR"):
        require_writable_directory(tmp_path / "file", "train writes the final model", WRITABLE_RUNS_FIX)


def test_multirun_command_lines():
    assert is_multirun(["-m", "method=grad_dot,grad_cos"]) and is_multirun(["--multirun"])
    assert is_multirun(["hydra.mode=MULTIRUN"])
    assert not is_multirun(["method=grad_dot", "hydra.run.dir=/tmp/m"])
