"""Issue 8, faults and scale-out: SIGKILL at a random moment and re-run, atomic artifacts,
a sharded gold standard through Hydra's submitit launcher, diverging runs, provenance checks.

The subprocess tests run the real entry points (`python train.py ...`) with the TINY
overrides; every delay before a kill is drawn at random and printed, so a failure can be
replayed."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import safetensors.torch
from conftest import ROOT, compose_config
from tda.artifacts import IntegrityError, load_json, load_tensors, load_tensors_with_metadata, save_json, save_tensors
from tda.further_training.store import further_training_key, load_gold_standard, seed_file
from tda.provenance import ProvenanceError, code_version
from tda.runs import RunDir
from tda.stages import attribute, evaluate, train

RNG = random.Random()  # unseeded on purpose: a different moment every run; printed for replay


@pytest.fixture(scope="module")
def _pipeline_cache(tmp_path_factory):
    """One TINY final model with its 2-seed gold standard and Grad-Dot scores, computed once."""
    from conftest import TINY

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
    import shutil

    dest = Path(os.environ["TDA_RUNS_DIR"])
    shutil.copytree(_pipeline_cache, dest, dirs_exist_ok=True)
    return RunDir.from_config(compose_config("train", tiny))


def _start(script: str, overrides: list[str], log: Path) -> subprocess.Popen:
    f = open(log, "ab")
    return subprocess.Popen([sys.executable, script, *overrides], cwd=ROOT, env=dict(os.environ), stdout=f, stderr=f)


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    rc = proc.wait(timeout=timeout)
    assert rc == 0, f"{proc.args} failed (rc={rc}):\n{log.read_text()[-4000:]}"


def _kill(proc: subprocess.Popen) -> bool:
    """SIGKILL (no cleanup handlers run); True if the process was still running."""
    alive = proc.poll() is None
    if alive:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return alive


def _wait_for(pred, proc: subprocess.Popen, timeout: float = 240) -> None:
    t0 = time.monotonic()
    while not pred():
        if proc.poll() is not None or time.monotonic() - t0 > timeout:
            return
        time.sleep(0.02)


# ------------------------------------------------------------------ atomic artifacts
_WRITER = """
import sys, torch
from tda.artifacts import save_tensors, save_json
path = sys.argv[1]
for i in range(100000):
    save_tensors(path + "/t.safetensors", {"x": torch.full((3_000_000,), float(i), dtype=torch.float64)}, metadata={"i": i})
    save_json(path + "/m.json", {"i": i, "pad": [i] * 200_000})
"""


def test_sigkill_during_writes_never_leaves_a_partial_artifact(tmp_path):
    for attempt in range(3):
        out = tmp_path / f"w{attempt}"
        out.mkdir()
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(out)], cwd=ROOT)
        _wait_for(lambda: (out / "m.json").is_file(), proc)
        delay = RNG.uniform(0.0, 0.6)
        print(f"attempt {attempt}: SIGKILL {delay:.3f}s after the first complete write")
        time.sleep(delay)
        assert _kill(proc), "the writer ended by itself"
        x = load_tensors(out / "t.safetensors")["x"]  # complete, or this raises
        assert x.shape == (3_000_000,) and bool((x == x[0]).all())
        m = load_json(out / "m.json")
        assert m["pad"] == [m["i"]] * 200_000
        # what a kill can leave behind is a hidden temporary file, never the artifact's name
        leftovers = [p.name for p in out.iterdir() if p.name not in ("t.safetensors", "m.json")]
        assert all(n.startswith(".") and ".tmp" in n for n in leftovers), leftovers


def test_partial_and_temporary_gold_files_are_not_taken_for_seeds(tiny, pipeline):
    cfg = compose_config("attribute", tiny + ["method=further_training"])
    gold_dir = attribute(cfg)  # finds every seed done
    run = pipeline
    # a temporary file a killed writer left behind is not seed 5, and not a part of seed 0
    (gold_dir / ".seed_00005.safetensors.abc123.tmp").write_bytes(b"partial")
    (gold_dir / ".seed_00000.part_01_of_02.safetensors.x.tmp").write_bytes(b"partial")
    assert load_gold_standard(gold_dir).seeds == [0, 1]
    # a damaged seed file is reported as corrupt, naming the file and the fix
    data = seed_file(gold_dir, 1).read_bytes()
    seed_file(gold_dir, 1).write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="corrupt artifact .*seed_00001.safetensors.*delete it and re-run"):
        load_gold_standard(gold_dir)
    assert run.final_model.is_file()


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
    proc = _start("train.py", overrides, log)
    delay = RNG.uniform(0.5, 6.0)
    print(f"train: SIGKILL after {delay:.2f}s")
    time.sleep(delay)
    _kill(proc)
    assert not run.final_model.is_file() or load_tensors(run.final_model)  # absent or complete
    _finish(_start("train.py", overrides, log), log)
    ref_model, model = load_tensors(run_ref.final_model), load_tensors(run.final_model)
    assert ref_model.keys() == model.keys() and all(torch.equal(ref_model[k], model[k]) for k in model)

    # further training: killed after its first seed completed (plus a random moment), re-run
    gold_dir = run.gold_dir(further_training_key(cfg))
    proc = _start("attribute.py", overrides + ["method=further_training"], log)
    _wait_for(lambda: seed_file(gold_dir, 0).is_file(), proc)
    delay = RNG.uniform(0.0, 0.3)
    print(f"further training: SIGKILL {delay:.2f}s after seed 0 was written")
    time.sleep(delay)
    assert _kill(proc), "further training finished before the kill; raise further_training.n_seeds"
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in gold_dir.glob("seed_*.safetensors")}
    assert 1 <= len(kept) < 6, kept
    _finish(_start("attribute.py", overrides + ["method=further_training"], log), log)
    for name, stamp in kept.items():  # completed seeds were kept, not redone
        p = gold_dir / name
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stamp, f"{name} was recomputed"
    gold = load_gold_standard(gold_dir)
    assert gold.seeds == gold_ref.seeds
    assert torch.equal(gold.diff, gold_ref.diff) and torch.equal(gold.full_loss, gold_ref.full_loss)

    # evaluate: killed at a random moment, re-run
    attribute(compose_config("attribute", overrides + ["method=grad_dot"]))
    proc = _start("evaluate.py", overrides, log)
    delay = RNG.uniform(0.5, 6.0)
    print(f"evaluate: SIGKILL after {delay:.2f}s")
    time.sleep(delay)
    _kill(proc)
    out = evaluate(compose_config("evaluate", overrides))
    for name in ("similarity.csv", "summary.csv"):
        a, b = pd.read_csv(eval_ref / name), pd.read_csv(out / name)
        measured = [c for c in a.columns if "seconds" in c or c.endswith("_mb")]  # cost measurements, not results
        pd.testing.assert_frame_equal(a.drop(columns=measured), b.drop(columns=measured))


# ------------------------------------------------------------------ sharding
@pytest.mark.slow
def test_sharded_gold_standard_through_submitit_equals_unsharded(tiny, tmp_path, pipeline):
    import shutil

    overrides = list(tiny)  # 2 seeds
    cfg = compose_config("attribute", overrides + ["method=further_training"])
    ref = load_gold_standard(pipeline.gold_dir(further_training_key(cfg)))
    shutil.rmtree(pipeline.path / "gold")
    log = tmp_path / "log.txt"
    # two jobs, each one half of the left-out instances, through the launcher a cluster uses
    _finish(_start("attribute.py", ["-m", "hydra/launcher=submitit_local", *overrides, "method=further_training",
                                    "further_training.left_out_shard.count=2",
                                    "further_training.left_out_shard.index=0,1"], log), log)
    gold_dir = pipeline.gold_dir(further_training_key(cfg))
    assert sorted(p.name for p in gold_dir.glob("seed_*")) == [
        f"seed_0000{s}.part_0{i}_of_02.safetensors" for s in (0, 1) for i in (1, 2)]
    gold = load_gold_standard(gold_dir)  # the merge
    assert gold.seeds == ref.seeds and gold.diff.shape == ref.diff.shape
    torch.testing.assert_close(gold.diff, ref.diff, rtol=0, atol=1e-12)
    torch.testing.assert_close(gold.full_loss, ref.full_loss, rtol=0, atol=1e-12)

    # the merge in evaluate names a missing part ...
    part = gold_dir / "seed_00001.part_02_of_02.safetensors"
    part.rename(tmp_path / part.name)
    with pytest.raises(FileNotFoundError, match=r"missing seed 1: parts \[2\] of 2"):
        evaluate(compose_config("evaluate", overrides))
    (tmp_path / part.name).rename(part)
    # ... and a seed computed twice under different shardings
    attribute(compose_config("attribute", overrides + ["method=further_training", "further_training.shard_seeds=[0]"]))
    with pytest.raises(ValueError, match="seed 0 has files of different shardings"):
        evaluate(compose_config("evaluate", overrides))
    seed_file(gold_dir, 0).unlink()
    evaluate(compose_config("evaluate", overrides))


def test_seed_shards_fill_one_directory_and_equal_unsharded(tiny, pipeline):
    import shutil

    overrides = list(tiny)  # 2 seeds
    ref = load_gold_standard(pipeline.gold_dir(further_training_key(compose_config("attribute", overrides))))
    shutil.rmtree(pipeline.path / "gold")
    for shard in ("[1]", "[0]"):
        gold_dir = attribute(compose_config("attribute", overrides + ["method=further_training",
                                                                       f"further_training.shard_seeds={shard}"]))
    gold = load_gold_standard(gold_dir)
    assert gold.seeds == [0, 1]
    assert torch.equal(gold.diff, ref.diff) and torch.equal(gold.full_loss, ref.full_loss)


def test_shard_settings_are_checked_before_work(tiny, pipeline):
    from tda.config import ConfigError

    with pytest.raises(ConfigError, match=r"shard_seeds contains \[7\], outside the seeds 0..1"):
        attribute(compose_config("attribute", tiny + ["method=further_training", "further_training.shard_seeds=[0,7]"]))
    with pytest.raises(ConfigError, match=r"left_out_shard.count=9 splits the 8 left-out instances into more shards"):
        attribute(compose_config("attribute", tiny + ["method=further_training", "further_training.left_out_shard.count=9"]))
    with pytest.raises(ConfigError, match=r"left_out_shard.index=2 must be in 0..1"):
        attribute(compose_config("attribute", tiny + ["method=further_training", "further_training.left_out_shard.index=2",
                                                      "further_training.left_out_shard.count=2"]))


# ------------------------------------------------------------------ divergence
def test_diverging_further_training_is_reported_with_seed_and_instances(tiny, pipeline):
    cfg = compose_config("attribute", tiny + ["method=further_training", "further_optimizer.lr=1e12"])
    with pytest.raises(FloatingPointError, match=r"diverged .* for seed 0: .*(full-data run|leaving out training instances \[)"):
        attribute(cfg)
    gold_dir = RunDir.from_config(cfg).gold_dir(further_training_key(cfg))
    assert not list(gold_dir.glob("seed_*.safetensors"))  # nothing written, so nothing averaged in


def test_non_finite_seed_file_is_never_averaged_in(tiny, pipeline):
    gold_dir = pipeline.gold_dir(further_training_key(compose_config("attribute", tiny)))
    t, header, _ = load_tensors_with_metadata(seed_file(gold_dir, 1))
    t["diff"][-1, 2, 3] = float("nan")  # a run that diverged in its last epoch
    with pytest.raises(FloatingPointError, match=r"refusing to write .*non-finite values \(NaN/inf\) in diff \(1 of"):
        save_tensors(seed_file(gold_dir, 1), t, metadata=header)
    # written by some other tool (no checksum): never loaded
    safetensors.torch.save_file(t, str(seed_file(gold_dir, 1)))
    with pytest.raises(IntegrityError, match=r"seed_00001.safetensors carries no checksum"):
        load_gold_standard(gold_dir)


# ------------------------------------------------------------------ provenance
def test_artifacts_carry_provenance(tiny, pipeline):
    run = pipeline
    sel = load_json(run.selection)
    prov = sel["provenance"]
    assert prov["code_version"] == code_version()
    assert prov["code_version"]["git_commit"] or prov["code_version"]["package_version"]
    assert prov["config"]["selection"]["n_left_out"] == 8 and prov["n_train"] == 96
    out = attribute(compose_config("attribute", tiny + ["method=grad_dot"]))
    record = load_json(out / "record.json")
    assert record["shape"] == [6, 8]
    assert record["left_out_indices"] == sel["left_out_indices"] and record["test_indices"] == sel["test_indices"]
    from tda.artifacts import load_tensor_metadata

    assert load_tensor_metadata(run.final_model)["code_version"] == code_version()


def test_cached_scores_for_other_instances_are_refused(tiny, pipeline):
    cfg = compose_config("attribute", tiny + ["method=grad_dot"])
    out = pipeline.method_dir(cfg)
    other = tiny + ["method=grad_dot", "selection.seed=1"]  # another selection of left-out instances
    train(compose_config("train", other))
    shutil.rmtree(out)
    shutil.copytree(attribute(compose_config("attribute", other)), out)
    with pytest.raises(ProvenanceError, match=r"(?s)refusing to combine the scores in .*final_model: .*selection.*Delete"):
        attribute(cfg)


def test_gold_standard_from_other_settings_is_refused(tiny, pipeline):
    gold_dir = pipeline.gold_dir(further_training_key(compose_config("attribute", tiny)))
    meta = json.loads((gold_dir / "meta.json").read_text())
    meta["further_optimizer"]["lr"] = 0.5  # e.g. a directory copied from another experiment
    save_json(gold_dir / "meta.json", meta)
    with pytest.raises(ProvenanceError, match=r"(?s)refusing to combine the gold standard.*further_optimizer"):
        evaluate(compose_config("evaluate", tiny))


def test_no_artifact_is_loaded_with_pickle():
    """Tensors go through safetensors and metadata through JSON; nothing in the package may
    unpickle (torch.load, pickle, numpy with allow_pickle)."""
    import re

    banned = re.compile(r"torch\.load\(|\bpickle\.loads?\(|allow_pickle\s*=\s*True|joblib\.load\(|\bdill\.")
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in sorted((ROOT / "tda").rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if banned.search(line)]
    assert not hits, f"unpickling in {hits}"
