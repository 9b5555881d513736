"""Fault injection, honest exits (issue 14): SIGTERM / SIGINT sent to real `python train.py` /
`python attribute.py` processes exit 143 / 130 with one message saying what was kept and how to
resume, keep every completed artifact, and a re-run of the same command completes with numbers
identical to an uninterrupted run; a failed stage's W&B run is recorded as failed; a cached job
logs no timings; the W&B group names the experiment and W&B writes only under the runs folder."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY, compose_config
from tda.artifacts import load_tensors
from tda.further_training.store import further_training_key
from tda.runs import RunDir
from tda.stages import attribute, train
from tda.tracking import offline_runs, read_offline_run, wandb_group

# slow enough further training (~1 s a seed on one core) to be caught between seeds
SLOW_FT = ["further_training.epochs=30", "further_training.n_seeds=6"]
NO_WANDB = [o for o in TINY if not o.startswith("further_training.n_seeds")] + SLOW_FT


def with_wandb(overrides: list[str]) -> list[str]:
    return [o for o in overrides if not o.startswith("logger=")] + ["logger=wandb"]


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


def trained(overrides: list[str]) -> RunDir:
    return train(compose_config("train", overrides))


# ---------------------------------------------------------------------------------- signals
def test_sigterm_during_train_exits_143_writes_no_model_and_fails_its_wandb_run(isolated_env):
    """Also: W&B's files (runs, cache, staging) stay under the runs folder, nothing in ./wandb
    or the home directory; the run's group is `<dataset>-<model>`."""
    tmp, cwd, home = isolated_env, isolated_env / "cwd", isolated_env / "home"
    cwd.mkdir(), home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR")}
    env["HOME"] = str(home)
    overrides = with_wandb(TINY) + ["train.epochs=100000"]
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
        assert set(load_tensors(gold / name)) == {"diff", "full_loss", "initial_loss"}

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


# ---------------------------------------------------------------------------------- W&B
def test_failed_stage_marks_its_wandb_run_failed_and_keeps_the_error(tiny, isolated_env):
    tiny = with_wandb(tiny)
    trained(tiny)
    with pytest.raises(FloatingPointError, match="further training diverged"):
        attribute(compose_config("attribute", tiny + ["method=further_training", "further_optimizer.lr=1e6"]))
    runs = {r["run"]["job_type"]: r for r in map(read_offline_run, offline_runs(isolated_env / "runs"))}
    assert runs["train"]["state"] == "finished" and runs["train"]["exit_code"] == 0
    assert runs["attribute"]["state"] == "failed" and runs["attribute"]["exit_code"] == 1


def test_cached_jobs_log_no_timings_and_are_tagged_cached(tiny, isolated_env):
    tiny = with_wandb(tiny)
    for _ in range(2):
        trained(tiny)
        for method in ("further_training", "grad_dot"):
            attribute(compose_config("attribute", tiny + [f"method={method}"]))
    runs = sorted((read_offline_run(d) for d in offline_runs(isolated_env / "runs")), key=lambda r: r["run"]["start_time"])
    assert [r["run"]["display_name"].rsplit("/", 1)[-1] for r in runs][3:] == \
        [r["run"]["display_name"].rsplit("/", 1)[-1] for r in runs][:3]
    first, again = runs[:3], runs[3:]
    for r in first:
        assert "cached" not in r["run"]["tags"] and "cached" not in r["summary"]
    for r in first[1:]:
        assert r["summary"]["seconds"] > 0 and "peak_mb" in r["summary"]
    for r in again:
        assert "cached" in r["run"]["tags"] and r["summary"]["cached"] is True and r["state"] == "finished"
        assert "seconds" not in r["summary"] and "peak_mb" not in r["summary"]
    assert again[1]["summary"]["seeds_done"] == 2 and again[1]["summary"]["seeds_computed"] == 0
    assert first[1]["summary"]["seeds_computed"] == 2
    assert {r["run"]["run_group"] for r in runs} == {"breast_cancer-mlp"}


def test_wandb_group_names_the_experiment():
    assert wandb_group(compose_config("train")) == "breast_cancer-mlp"
    assert wandb_group(compose_config("train", ["dataset=digits", "model=small_cnn"])) == "digits-small_cnn"
    assert wandb_group(compose_config("train", ["experiment=folktables_sgd_cpu"])) == "folktables_sgd_cpu"
    assert wandb_group(compose_config("train", ["name=sweep1"])) == "sweep1"
    assert wandb_group(compose_config("train", ["logger.group=g"])) == "g"
