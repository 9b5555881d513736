"""A multirun whose jobs run in worker processes (hydra/launcher=joblib), interrupted by a signal
to the launching process alone, as a scheduler or `kill` sends it: the launcher stops its
workers (none computes on), says how to resume, exits 128 + signal, and the same command run
again completes the gold standard (real processes, a real signal)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.config import ROOT, TINY

from tda.further_training.store import load_gold_standard

pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="the launchers extra is not installed")

# two jobs of two seeds each, in two loky workers; a seed takes about a second
SWEEP = ["-m", *TINY, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "method=further_training",
         "further_training.epochs=40", "further_training.n_seeds=4", "further_training.shard_seeds=[0,2],[1,3]"]


def children(pid: int) -> set[int]:
    """Every live (not zombie) process whose parent is `pid`, and theirs, from /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        state, ppid = text[text.rfind(")") + 2:].split()[:2]
        if state != "Z":
            parents[int(entry.name)] = int(ppid)
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        new = {c for c, pp in parents.items() if pp == p}
        found |= new
        todo += list(new)
    return found


def alive(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rfind(")") + 2:].split()[0] != "Z"


def is_worker(pid: int) -> bool:
    try:
        return b"LokyProcess" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads processes from /proc (Linux)")
def test_a_signal_to_a_joblib_sweep_stops_its_workers_and_a_rerun_completes(pipeline, tmp_path):
    signum = signal.SIGTERM  # SIGINT takes the same path (tda.interrupt.signals_raise)
    gold_root = pipeline.path / "gold"
    before = set(gold_root.iterdir())
    log = tmp_path / "sweep.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with open(log, "wb") as out:
        sweep = subprocess.Popen([sys.executable, "attribute.py", *SWEEP], cwd=ROOT, env=env, stdout=out,
                                 stderr=subprocess.STDOUT)
    try:
        started = time.monotonic()
        workers: set[int] = set()
        # a worker has started a seed once it holds a seed lock in the new gold standard's directory
        while not any((d / ".lock").exists() for d in set(gold_root.iterdir()) - before):
            assert sweep.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() - started < 120, "no worker started a seed"
            workers |= {p for p in children(sweep.pid) if is_worker(p)}
            time.sleep(0.05)
        workers |= {p for p in children(sweep.pid) if is_worker(p)}
        assert workers, "the sweep runs its jobs in loky workers"
        sweep.send_signal(signum)
        assert sweep.wait(timeout=30) == 128 + signum
    finally:
        if sweep.poll() is None:
            sweep.kill()
    text = log.read_text()
    assert (f"interrupted by {signal.Signals(signum).name} during a multirun of the attribute stage: its worker "
            f"processes were stopped; every artifact its jobs completed is kept (those in progress were not "
            f"written); re-run the same command to resume") in text
    assert "Traceback" not in text
    time.sleep(2)
    assert not [p for p in workers if alive(p)], "no worker computes on"
    (gold,) = set(gold_root.iterdir()) - before
    assert len(list(gold.glob("seed_*.safetensors"))) < 4  # it was stopped before the end

    again = subprocess.run([sys.executable, "attribute.py", *SWEEP], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    assert load_gold_standard(gold).seeds == [0, 1, 2, 3]
