"""Fault injection, provenance and integrity: artifacts that do not belong together are never
combined, damaged artifacts are never used, and retraining never mixes old and new results.
Each case asserts a clear refusal, or numbers identical to an undisturbed run."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY, compose_config
from tda.artifacts import IntegrityError, load_json, load_tensors, save_json
from tda.further_training.store import further_training_key, load_gold_standard, seed_file
from tda.provenance import ProvenanceError
from tda.runs import RunDir
from tda.stages import attribute, evaluate, train


@pytest.fixture(scope="module")
def _cache(tmp_path_factory):
    """One tiny final model with its 3-seed gold standard (whole and in two parts) and Grad-Dot
    scores, and a second final model (train.epochs=4) with the same, computed once."""
    root = tmp_path_factory.mktemp("faults")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TDA_RUNS_DIR", str(root))
        for extra in ([], ["train.epochs=4"]):
            o = TINY + ["further_training.n_seeds=3"] + extra
            train(compose_config("train", o))
            for method in ("further_training", "grad_dot"):
                attribute(compose_config("attribute", o + [f"method={method}"]))
        for index in (0, 1):  # the same gold standard in two parts, with another lr (another key)
            attribute(compose_config("attribute", TINY + ["further_training.n_seeds=3", "method=further_training",
                                                          "further_optimizer.lr=1e-3",
                                                          f"further_training.left_out_shard.index={index}",
                                                          "further_training.left_out_shard.count=2"]))
    return root


@pytest.fixture
def runs(_cache):
    dest = Path(os.environ["TDA_RUNS_DIR"])
    shutil.copytree(_cache, dest, dirs_exist_ok=True)
    return dest


BASE = TINY + ["further_training.n_seeds=3"]
OTHER = BASE + ["train.epochs=4"]
LR = ["further_optimizer.lr=1e-3"]


def _run(overrides) -> RunDir:
    return RunDir.from_config(compose_config("train", overrides))


def _gold_dir(overrides) -> Path:
    return _run(overrides).gold_dir(further_training_key(compose_config("attribute", overrides)))


def _method_dir(overrides, method="grad_dot") -> Path:
    return _run(overrides).method_dir(compose_config("attribute", overrides + [f"method={method}"]))


def _flip_bit(path: Path, from_end: int = 9) -> None:
    """Flip one bit in the data section of a safetensors file (the header is at the start)."""
    data = bytearray(path.read_bytes())
    data[len(data) - from_end] ^= 0x40
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------ retraining
def test_retraining_to_other_weights_supersedes_every_dependent_result(runs):
    run = _run(BASE)
    gold_before = load_gold_standard(_gold_dir(BASE)).diff
    train(compose_config("train", BASE + ["train.overwrite=true"]))  # deterministic: the same weights again
    assert (run.path / "gold").is_dir() and not (run.path / "superseded").exists()  # all results kept
    assert torch.equal(load_gold_standard(_gold_dir(BASE)).diff, gold_before)
    # a final model with other weights in the directory (stands in for a retrain on other hardware)
    shutil.copy(_run(OTHER).final_model, run.final_model)
    with pytest.raises(ProvenanceError, match="run: artifact has"):  # its own header gives it away
        train(compose_config("train", BASE))
    train(compose_config("train", BASE + ["train.overwrite=true"]))  # the fix the message gives
    moved = list((run.path / "superseded").iterdir())
    assert len(moved) == 1 and {"gold", "methods"} <= {p.name for p in moved[0].iterdir()}
    assert not (run.path / "gold").exists() and not (run.path / "methods").exists()
    attribute(compose_config("attribute", BASE + ["method=further_training"]))  # recomputed for the new model
    assert torch.equal(load_gold_standard(_gold_dir(BASE)).diff, gold_before)  # (which has BASE's weights again)


def test_new_seed_after_retraining_never_mixes_with_old_seeds(runs):
    run = _run(BASE)
    gold_dir = _gold_dir(BASE)
    seed_file(gold_dir, 2).unlink()
    # the run directory's final model is replaced by another one with a valid header of its own
    shutil.copy(_run(OTHER).final_model, run.final_model)
    with pytest.raises(ProvenanceError, match="refusing to combine the final model"):
        attribute(compose_config("attribute", BASE + ["method=further_training"]))
    assert not seed_file(gold_dir, 2).exists()


# ------------------------------------------------------------------ copies from elsewhere
def test_final_model_copied_from_another_run_is_refused(runs):
    shutil.copy(_run(OTHER).final_model, _run(BASE).final_model)
    for stage, extra in (("attribute", ["method=grad_dot"]), ("evaluate", []), ("train", [])):
        with pytest.raises(ProvenanceError, match=r"(?s)refusing to combine the final model.*run: artifact has"):
            {"attribute": attribute, "evaluate": evaluate, "train": train}[stage](compose_config(stage, BASE + extra))


def test_method_scores_copied_from_another_final_model_are_refused(runs):
    mine, other = _method_dir(BASE), _method_dir(OTHER)
    assert mine.name == other.name  # same method settings: same directory name in both runs
    shutil.rmtree(mine)
    shutil.copytree(other, mine)
    with pytest.raises(ProvenanceError, match=r"(?s)refusing to combine the scores in .*final_model: .*weights: artifact has"):
        attribute(compose_config("attribute", BASE + ["method=grad_dot"]))
    with pytest.raises(ProvenanceError, match=r"(?s)refusing to combine the scores in .*final_model: .*weights: artifact has"):
        evaluate(compose_config("evaluate", BASE))


def test_record_of_another_method_beside_the_scores_is_refused(runs):
    shutil.copy(_method_dir(OTHER) / "record.json", _method_dir(BASE) / "record.json")
    with pytest.raises(ProvenanceError, match=r"record.json does not describe .*scores.safetensors"):
        evaluate(compose_config("evaluate", BASE))


def test_gold_standard_copied_from_another_final_model_is_refused(runs):
    mine, other = _gold_dir(BASE), _gold_dir(OTHER)
    assert mine.name == other.name
    shutil.rmtree(mine)
    shutil.copytree(other, mine)
    with pytest.raises(ProvenanceError, match=r"(?s)refusing to combine the gold standard .*final_model: .*weights: artifact has"):
        evaluate(compose_config("evaluate", BASE))
    with pytest.raises(ProvenanceError, match=r"(?s)refusing to combine the gold standard .*final_model: .*weights: artifact has"):
        attribute(compose_config("attribute", BASE + ["method=further_training"]))


def test_seed_file_copied_from_another_final_model_is_refused(runs):
    shutil.copy(seed_file(_gold_dir(OTHER), 1), seed_file(_gold_dir(BASE), 1))
    with pytest.raises(ProvenanceError, match=r"(?s)gold-standard file .*seed_00001.safetensors.*final_model"):
        evaluate(compose_config("evaluate", BASE))
    with pytest.raises(ProvenanceError, match=r"(?s)gold-standard file .*seed_00001.safetensors"):
        attribute(compose_config("attribute", BASE + ["method=further_training"]))  # not "already there"


def test_seed_copied_as_another_seed_is_refused(runs):
    gold_dir = _gold_dir(BASE)
    shutil.copy(seed_file(gold_dir, 0), seed_file(gold_dir, 2))
    with pytest.raises(ProvenanceError, match=r"(?s)seed_00002.safetensors \(its header names another seed.*seed: "
                                              r"artifact has 0, this run needs 2"):
        evaluate(compose_config("evaluate", BASE))


def test_seed_copied_from_a_gold_standard_with_other_settings_is_refused(runs):
    lr_dir = _gold_dir(BASE + LR)
    whole = seed_file(_gold_dir(BASE), 1)
    # the lr 1e-3 gold standard exists only in parts: take its first part under the whole seed's name
    shutil.copy(seed_file(lr_dir, 1, (0, 2)), whole)
    with pytest.raises(ProvenanceError, match=r"(?s)seed_00001.safetensors.*further_optimizer: lr: artifact has 0.001"):
        evaluate(compose_config("evaluate", BASE))


def test_part_copied_over_another_part_is_refused(runs):
    lr_dir = _gold_dir(BASE + LR)
    assert torch.isfinite(load_gold_standard(lr_dir).diff).all()  # the two parts merge
    shutil.copy(seed_file(lr_dir, 0, (0, 2)), seed_file(lr_dir, 0, (1, 2)))
    with pytest.raises(ProvenanceError, match=r"(?s)part_02_of_02.safetensors \(its header names another seed or part"):
        evaluate(compose_config("evaluate", BASE + LR))


def test_meta_json_edited_by_hand_is_refused(runs):
    meta_path = _gold_dir(BASE) / "meta.json"
    text = meta_path.read_text()
    meta_path.write_text(text.replace('"seeds": [\n    0,\n    1,\n    2\n  ]', '"seeds": [\n    0,\n    1\n  ]'))
    assert meta_path.read_text() != text
    with pytest.raises(IntegrityError, match=r"meta.json was changed after it was written"):
        evaluate(compose_config("evaluate", BASE))
    # a key deleted and the checksum recomputed (another tool's write): the missing field is an error
    meta = load_json(meta_path, verify=False)
    meta.pop("_sha256"), meta.pop("final_model")
    save_json(meta_path, meta)
    with pytest.raises(ProvenanceError, match=r"meta.json does not record \['final_model'\]"):
        evaluate(compose_config("evaluate", BASE))


def test_evaluate_averages_the_seeds_of_the_config_not_of_meta_json(runs):
    gold = load_gold_standard(_gold_dir(BASE), seeds=[0, 1, 2])
    assert gold.seeds == [0, 1, 2]
    out = evaluate(compose_config("evaluate", BASE))
    assert load_json(out / "evaluated.json")["seeds"] == [0, 1, 2]
    seed_file(_gold_dir(BASE), 2).unlink()
    with pytest.raises(FileNotFoundError, match="missing seed 2"):
        evaluate(compose_config("evaluate", BASE))


# ------------------------------------------------------------------ damaged files
@pytest.mark.parametrize("what", ["final_model", "scores", "seed", "features_json"])
def test_a_flipped_bit_is_detected_on_load(runs, what):
    run = _run(BASE)
    path = {"final_model": run.final_model, "scores": _method_dir(BASE) / "scores.safetensors",
            "seed": seed_file(_gold_dir(BASE), 1), "features_json": run.selection}[what]
    if what == "features_json":  # a digit changed in selection.json
        text = path.read_text()
        path.write_text(text.replace('"selection_seed": 0', '"selection_seed": 1'))
    else:
        _flip_bit(path)
    pattern = {"final_model": r"final model .* is damaged or truncated .*does not match the checksum.*train.overwrite=true",
               "scores": r"scores.safetensors is damaged: its data does not match the checksum",
               "seed": r"seed_00001.safetensors is damaged: its data does not match the checksum",
               "features_json": r"selection.json was changed after it was written"}[what]
    with pytest.raises(IntegrityError, match=pattern):
        evaluate(compose_config("evaluate", BASE))
    if what in ("final_model", "features_json"):
        with pytest.raises(IntegrityError, match=pattern):
            train(compose_config("train", BASE))  # never "already trained" for a damaged model
    if what == "scores":
        with pytest.raises(IntegrityError, match=pattern):
            attribute(compose_config("attribute", BASE + ["method=grad_dot"]))  # never "already in"


def test_truncated_scores_are_not_taken_as_already_computed(runs):
    path = _method_dir(BASE) / "scores.safetensors"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(IntegrityError, match=r"scores.safetensors"):
        attribute(compose_config("attribute", BASE + ["method=grad_dot"]))
    path.unlink()  # the fix the message gives
    out = attribute(compose_config("attribute", BASE + ["method=grad_dot"]))
    assert torch.equal(load_tensors(out / "scores.safetensors")["scores"],
                       load_tensors(_method_dir(BASE, "grad_dot") / "scores.safetensors")["scores"])


# ------------------------------------------------------------------ files: temporaries and modes
def test_temporary_files_of_dead_writers_are_removed_and_live_ones_kept(runs):
    gold_dir = _gold_dir(BASE)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname().replace(".", "_")
    stale = gold_dir / f".seed_00001.safetensors.{host}-{int(dead.stdout)}.abc123.tmp"
    live = gold_dir / f".seed_00002.safetensors.{host}-{os.getpid()}.def456.tmp"
    stale.write_bytes(b"partial"), live.write_bytes(b"partial")
    attribute(compose_config("attribute", BASE + ["method=further_training"]))
    assert not stale.exists() and live.exists()


def test_artifacts_honour_the_umask(tiny, tmp_path):
    old = os.umask(0o027)
    try:
        run = train(compose_config("train", tiny))
    finally:
        os.umask(old)
    for p in (run.final_model, run.selection, run.metrics):
        assert p.stat().st_mode & 0o777 == 0o640, p


# ------------------------------------------------------------------ concurrent identical jobs
@pytest.mark.slow
def test_identical_concurrent_further_training_jobs_split_the_seeds(tiny, tmp_path):
    overrides = tiny + ["further_training.n_seeds=4", "further_training.epochs=6", "trainer.progress_bar=false"]
    train(compose_config("train", overrides))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    logs = [tmp_path / f"job{i}.log" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "attribute.py", *overrides, "method=further_training"], cwd=ROOT,
                              env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT) for log in logs]
    assert [p.wait(timeout=600) for p in procs] == [0, 0], [log.read_text()[-2000:] for log in logs]
    text = "".join(log.read_text() for log in logs)
    computed = [line for line in text.splitlines() if "further training seed" in line]
    assert len(computed) == 4, text[-3000:]  # every seed computed exactly once between the two jobs
    gold_dir = RunDir.from_config(compose_config("train", overrides)).gold_dir(further_training_key(compose_config("attribute", overrides)))
    together = load_gold_standard(gold_dir)
    shutil.rmtree(gold_dir)
    attribute(compose_config("attribute", overrides + ["method=further_training"]))
    assert torch.equal(load_gold_standard(gold_dir).diff, together.diff)


def test_trainer_arguments_that_change_training_are_part_of_the_run(tiny):
    base = _run(tiny).path.name
    assert _run(tiny + ["+trainer.accumulate_grad_batches=2"]).path.name != base
    assert _run(tiny + ["+trainer.limit_train_batches=3"]).path.name != base
    for display_only in ("+trainer.enable_model_summary=true", "+trainer.log_every_n_steps=5", "trainer.devices=1"):
        assert _run(tiny + [display_only]).path.name == base, display_only
