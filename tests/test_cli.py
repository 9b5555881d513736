"""The command line (tda.cli, tda.interrupt, tda.exits), run as real processes: a user error is one
message and exit status 2 (the traceback only with HYDRA_FULL_ERROR=1), a bug keeps its traceback;
SIGTERM / SIGINT exit 143 / 130 with one message saying what was kept and how to resume; after
SIGTERM, SIGINT or SIGKILL at a random moment the same command completes with numbers identical to
an uninterrupted run. Every delay before a kill is drawn at random and printed, so a failure can be
replayed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers.config import ROOT, TINY, compose_config
from helpers.processes import RNG, finish_logged, poll_until, sigkill, start_logged
from helpers.runs import trained
from helpers.wandb import offline_runs, read_offline_run, wandb_on

from tda.artifacts import load_tensors
from tda.further_training.store import further_training_key, load_gold_standard, seed_file
from tda.interrupt import describe
from tda.runs import RunDir
from tda.stages import KEPT, attribute, evaluate, train


# ------------------------------------------------------------------ user errors
def _run(args: list[str], cwd, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=dict(os.environ, OMP_NUM_THREADS="1", **env),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("script, overrides, expect", [
    ("train.py", ["train.epochs=0"], "train.epochs=0 must be positive; train for at least one epoch"),
    ("train.py", ["train.epochz=3"], "Could not override 'train.epochz'"),  # Hydra's own
    ("attribute.py", ["method=grad_dott"], "Could not find 'method/grad_dott'"),  # Hydra's own
    ("evaluate.py", [], "no final model in"),  # a missing stage output
    ("train.py", ["-m", "train.epochs=1,0"], "train.epochs=0 must be positive"),  # multirun
], ids=["bad-value", "hydra-key", "hydra-option", "missing-final-model", "multirun"])
def test_user_error_is_one_message_and_exit_2(tmp_path, script, overrides, expect):
    proc = _run([str(ROOT / script), *overrides, "logger=none", "trainer.progress_bar=false", "dataset.max_train=96",
                 "dataset.max_test=40"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert expect in proc.stderr and "Traceback" not in proc.stderr
    message = ("\n" + proc.stderr).split("\nError: ", 1)[1]  # a multirun's first job logs before it
    assert expect in message and len(message.splitlines()) <= 25  # Hydra lists the options of a group


@pytest.mark.slow
def test_full_error_shows_the_traceback_and_bugs_always_do(tmp_path):
    proc = _run([str(ROOT / "train.py"), "logger=none", "train.epochs=0"], tmp_path, HYDRA_FULL_ERROR="1")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr
    proc = _run([str(ROOT / "train.py"), "logger=none", "train.epochz=3"], tmp_path, HYDRA_FULL_ERROR="1")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ConfigCompositionException" in proc.stderr
    # a bug (here: a dataset constructor that cannot take the dataset's arguments) keeps its traceback
    proc = _run([str(ROOT / "train.py"), "logger=none", "dataset._target_=builtins.int"], tmp_path)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "TypeError" in proc.stderr


@pytest.mark.slow
def test_console_script_functions_run_the_same_apps(tmp_path):
    """`tda-evaluate` is tda.cli:evaluate (pyproject.toml [project.scripts])."""
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"tda-train": "tda.cli:train", "tda-further-train": "tda.cli:further_train",
                       "tda-attribute": "tda.cli:attribute", "tda-evaluate": "tda.cli:evaluate"}
    proc = _run(["-c", "from tda.cli import evaluate; evaluate()", "logger=none"], tmp_path)
    assert proc.returncode == 2 and "no final model in" in proc.stderr and "Traceback" not in proc.stderr


def test_train_py_exits_non_zero_on_a_diverged_final_training(tmp_path):
    """The entry point, as a scheduler runs it: non-zero exit, the message, no final model."""
    import os
    import subprocess
    import sys

    from helpers.config import ROOT

    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "dataset.max_train=96", "dataset.max_test=40",
                           "train.epochs=3", "logger=none", "trainer.progress_bar=false", "optimizer.lr=1e12"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "final training diverged" in proc.stderr and "train.gradient_clip_val" in proc.stderr
    assert not list((tmp_path / "runs").rglob("final_model.safetensors"))


# ------------------------------------------------------------------ SIGTERM / SIGINT
# slow enough further training (~1 s a seed on one core) to be caught between seeds
SLOW_FT = ["further_training.epochs=30", "further_training.n_seeds=6"]


NO_WANDB = [o for o in TINY if not o.startswith("further_training.n_seeds")] + SLOW_FT


def start(script: str, args: list[str], tmp: Path, cwd: Path = ROOT, env: dict | None = None) -> subprocess.Popen:
    """`python <script> <args>` in its own process, stdout / stderr into files under `tmp`."""
    env = dict(os.environ if env is None else env, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", WANDB_MODE="offline")
    with open(tmp / f"{script}.out", "w") as out, open(tmp / f"{script}.err", "w") as err:  # the child keeps them
        return subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL)


def stderr_of(tmp: Path, script: str) -> str:
    return (tmp / f"{script}.err").read_text()


def wait_for(condition, proc: subprocess.Popen, tmp: Path, script: str, timeout: float = 300) -> None:
    """Poll until `condition()` holds while `proc` still runs (the job is in its long phase)."""
    end = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"{script} ended ({proc.returncode}) before it could be interrupted: " \
                                    f"{stderr_of(tmp, script)[-3000:]}"
        assert time.monotonic() < end, f"{script} did not reach its long phase in {timeout}s"
        time.sleep(0.05)


def interrupt(proc: subprocess.Popen, sig: int) -> int:
    proc.send_signal(sig)
    return proc.wait(timeout=120)


def seed_files(gold: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(gold.glob("seed_*.safetensors"))}


def test_sigterm_during_train_exits_143_writes_no_model_and_fails_its_wandb_run(isolated_env):
    """Also: W&B's files (runs, cache, staging) stay under the runs folder, nothing in ./wandb
    or the home directory; the run's group is `<dataset>-<model>`."""
    tmp, cwd, home = isolated_env, isolated_env / "cwd", isolated_env / "home"
    cwd.mkdir(), home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR")}
    env["HOME"] = str(home)
    overrides = wandb_on(TINY) + ["train.epochs=100000"]
    proc = start("train.py", overrides, tmp, cwd=cwd, env=env)
    # in trainer.fit: W&B's log has grown by two 32 KiB blocks of logged curves
    wait_for(lambda: any(f.stat().st_size >= 65536 for d in offline_runs(tmp / "runs") for f in d.glob("run-*.wandb")),
             proc, tmp, "train.py")
    assert interrupt(proc, signal.SIGTERM) == 143
    err = stderr_of(tmp, "train.py")
    assert ("interrupted by SIGTERM during training: no final model was written (training does not resume "
            "mid-way); re-run the same command to train it") in err
    assert "Traceback" not in err
    run = RunDir.from_config(compose_config("train", overrides))
    assert not run.final_model.exists()

    [wb] = [read_offline_run(d) for d in offline_runs(tmp / "runs")]
    assert wb["exit_code"] == 143 and wb["state"] == "failed"
    assert wb["run"]["run_group"] == "breast_cancer-mlp"
    assert any("train/loss" in r for r in wb["history"])  # it was interrupted mid-training
    assert not (cwd / "wandb").exists()
    assert [p for p in home.rglob("*") if "wandb" in p.name] == []
    assert any((tmp / "runs" / "wandb" / "cache").rglob("*"))  # wandb-core's logs


@pytest.mark.slow
def test_sigterm_during_further_training_keeps_seeds_and_resumes_to_identical_numbers(isolated_env):
    tmp = isolated_env
    run = trained(NO_WANDB)
    cfg = compose_config("attribute", NO_WANDB + ["method=further_training"])
    gold = run.gold_dir(further_training_key(cfg))
    args = NO_WANDB + ["method=further_training"]
    proc = start("attribute.py", args, tmp)
    wait_for(lambda: (gold / "seed_00000.safetensors").is_file(), proc, tmp, "attribute.py")
    assert interrupt(proc, signal.SIGTERM) == 143
    kept = seed_files(gold)
    assert 1 <= len(kept) < 6
    err = stderr_of(tmp, "attribute.py")
    assert (f"interrupted by SIGTERM during further training: {len(kept)} of 6 seeds are complete in {gold} "
            f"(the seed in progress was not written); re-run the same command to resume") in err
    assert "Traceback" not in err
    for name in kept:
        assert set(load_tensors(gold / name)) == {"diff", "full_loss", "initial_loss", "distance_from_start"}

    proc = start("attribute.py", args, tmp)  # the same command resumes
    assert proc.wait(timeout=600) == 0, stderr_of(tmp, "attribute.py")[-3000:]
    resumed = seed_files(gold)
    assert len(resumed) == 6 and all(resumed[n] == b for n, b in kept.items())  # kept seeds not redone

    shutil.move(str(gold), str(tmp / "resumed"))
    attribute(cfg)  # an uninterrupted run of all seeds
    for name in resumed:
        a, b = load_tensors(tmp / "resumed" / name), load_tensors(gold / name)
        assert all(torch.equal(a[k], b[k]) for k in ("diff", "full_loss", "initial_loss")), name


@pytest.mark.slow
def test_sigint_stops_a_multirun_sweep_with_130_and_the_rerun_completes_it(isolated_env):
    tmp = isolated_env
    run = trained(NO_WANDB)
    gold = run.gold_dir(further_training_key(compose_config("attribute", NO_WANDB + ["method=further_training"])))
    args = ["-m", "method=further_training,grad_dot", *NO_WANDB]
    proc = start("attribute.py", args, tmp)
    wait_for(lambda: (gold / "seed_00000.safetensors").is_file(), proc, tmp, "attribute.py")
    assert interrupt(proc, signal.SIGINT) == 130
    kept = seed_files(gold)
    assert f"interrupted by SIGINT during further training: {len(kept)} of 6 seeds are complete" in \
        stderr_of(tmp, "attribute.py")
    assert not list(run.path.glob("methods/grad_dot-*"))  # the sweep stopped: its next job never ran

    proc = start("attribute.py", args, tmp)
    assert proc.wait(timeout=600) == 0, stderr_of(tmp, "attribute.py")[-3000:]
    resumed = seed_files(gold)
    assert len(resumed) == 6 and all(resumed[n] == b for n, b in kept.items())
    assert len(list(run.path.glob("methods/grad_dot-*/scores.safetensors"))) == 1


def test_interruption_message_names_the_gold_stage(tiny):
    cfg = compose_config("further_train", tiny)
    what, kept, resume = describe(KEPT["further_train"], "further_train", cfg)
    assert what == "further training" and kept.startswith("0 of 2 seeds are complete in ")
    alias = compose_config("attribute", tiny + ["method=further_training"])
    assert describe(KEPT["attribute"], "attribute", alias)[:2] == (what, kept)
    # a stage whose state cannot be read still says what was running
    unreadable = describe(KEPT["attribute"], "attribute", compose_config("attribute", tiny + ["method.name=a/b"]))
    assert unreadable.doing == "attribute" and "their state could not be read" in unreadable.kept


# ------------------------------------------------------------------ SIGKILL and re-run
@pytest.mark.slow
def test_sigkill_each_stage_and_rerun_gives_identical_numbers(tiny, tmp_path, monkeypatch):
    # enough work per seed (40 epochs) that a kill shortly after seed 0 lands before the last seed,
    # even on a fast idle machine
    overrides = tiny + ["further_training.n_seeds=6", "further_training.epochs=40"]
    # the uninterrupted reference, in-process
    monkeypatch.setenv("TDA_RUNS_DIR", str(tmp_path / "ref"))
    run_ref = train(compose_config("train", overrides))
    gold_ref = load_gold_standard(attribute(compose_config("attribute", overrides + ["method=further_training"])))
    attribute(compose_config("attribute", overrides + ["method=grad_dot"]))
    eval_ref = evaluate(compose_config("evaluate", overrides))

    monkeypatch.setenv("TDA_RUNS_DIR", str(tmp_path / "killed"))
    log = tmp_path / "log.txt"
    cfg = compose_config("attribute", overrides + ["method=further_training"])
    run = RunDir.from_config(cfg)

    # train: killed at a random moment, re-run
    proc = start_logged("train.py", overrides, log)
    delay = RNG.uniform(0.5, 6.0)
    print(f"train: SIGKILL after {delay:.2f}s")
    time.sleep(delay)
    sigkill(proc)
    assert not run.final_model.is_file() or load_tensors(run.final_model)  # absent or complete
    finish_logged(start_logged("train.py", overrides, log), log)
    ref_model, model = load_tensors(run_ref.final_model), load_tensors(run.final_model)
    assert ref_model.keys() == model.keys() and all(torch.equal(ref_model[k], model[k]) for k in model)

    # further training: killed after its first seed completed (plus a random moment), re-run
    gold_dir = run.gold_dir(further_training_key(cfg))
    proc = start_logged("attribute.py", overrides + ["method=further_training"], log)
    poll_until(lambda: seed_file(gold_dir, 0).is_file(), proc)
    delay = RNG.uniform(0.0, 0.3)
    print(f"further training: SIGKILL {delay:.2f}s after seed 0 was written")
    time.sleep(delay)
    assert sigkill(proc), "further training finished before the kill; raise further_training.n_seeds"
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in gold_dir.glob("seed_*.safetensors")}
    assert 1 <= len(kept) < 6, kept
    finish_logged(start_logged("attribute.py", overrides + ["method=further_training"], log), log)
    for name, stamp in kept.items():  # completed seeds were kept, not redone
        p = gold_dir / name
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stamp, f"{name} was recomputed"
    gold = load_gold_standard(gold_dir)
    assert gold.seeds == gold_ref.seeds
    assert torch.equal(gold.diff, gold_ref.diff) and torch.equal(gold.full_loss, gold_ref.full_loss)

    # evaluate: killed at a random moment, re-run
    attribute(compose_config("attribute", overrides + ["method=grad_dot"]))
    proc = start_logged("evaluate.py", overrides, log)
    delay = RNG.uniform(0.5, 6.0)
    print(f"evaluate: SIGKILL after {delay:.2f}s")
    time.sleep(delay)
    sigkill(proc)
    out = evaluate(compose_config("evaluate", overrides))
    for name in ("similarity.csv", "summary.csv"):
        a, b = pd.read_csv(eval_ref / name), pd.read_csv(out / name)
        measured = [c for c in a.columns if "seconds" in c or c.endswith("_mb")]  # cost measurements, not results
        pd.testing.assert_frame_equal(a.drop(columns=measured), b.drop(columns=measured))
