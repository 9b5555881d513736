"""Artifacts on disk (tda.artifacts): written atomically (a SIGKILL at a random moment never
leaves a partial file under the artifact's name), with the umask's permissions, never holding NaN/inf;
verified on every load (a flipped bit, a truncated or hand-edited file, a file without a checksum are
refused, never taken as already computed); temporary files of dead writers removed; nothing unpickled."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from helpers.config import ROOT, compose_config
from helpers.processes import RNG, poll_until, sigkill
from helpers.runs import BASE, gold_dir_of, method_dir_of, run_of

from tda.artifacts import (
    IntegrityError,
    load_json,
    load_tensors,
    load_tensors_with_metadata,
    save_tensors,
    tensor_checksum,
)
from tda.further_training.store import further_training_key, load_gold_standard, seed_file
from tda.stages import attribute, evaluate, train

# ------------------------------------------------------------------ atomic writes
_WRITER = """
import sys, torch
from tda.artifacts import save_tensors, save_json
path = sys.argv[1]
for i in range(100000):
    save_tensors(path + "/t.safetensors", {"x": torch.full((3_000_000,), float(i), dtype=torch.float64)},
                 metadata={"i": i})
    save_json(path + "/m.json", {"i": i, "pad": [i] * 200_000})
"""


def test_sigkill_during_writes_never_leaves_a_partial_artifact(tmp_path):
    for attempt in range(3):
        out = tmp_path / f"w{attempt}"
        out.mkdir()
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(out)], cwd=ROOT)
        poll_until(lambda out=out: (out / "m.json").is_file(), proc)
        delay = RNG.uniform(0.0, 0.6)
        print(f"attempt {attempt}: SIGKILL {delay:.3f}s after the first complete write")
        time.sleep(delay)
        assert sigkill(proc), "the writer ended by itself"
        x = load_tensors(out / "t.safetensors")["x"]  # complete, or this raises
        assert x.shape == (3_000_000,) and bool((x == x[0]).all())
        m = load_json(out / "m.json")
        assert m["pad"] == [m["i"]] * 200_000
        # what a kill can leave behind is a hidden temporary file, never the artifact's name
        leftovers = [p.name for p in out.iterdir() if p.name not in ("t.safetensors", "m.json")]
        assert all(n.startswith(".") and ".tmp" in n for n in leftovers), leftovers


def test_artifacts_honour_the_umask(tiny, tmp_path):
    old = os.umask(0o027)
    try:
        run = train(compose_config("train", tiny))
    finally:
        os.umask(old)
    for p in (run.final_model, run.selection, run.metrics):
        assert p.stat().st_mode & 0o777 == 0o640, p


def test_temporary_files_of_dead_writers_are_removed_and_live_ones_kept(runs):
    gold_dir = gold_dir_of(BASE)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname().replace(".", "_")
    stale = gold_dir / f".seed_00001.safetensors.{host}-{int(dead.stdout)}.abc123.tmp"
    live = gold_dir / f".seed_00002.safetensors.{host}-{os.getpid()}.def456.tmp"
    stale.write_bytes(b"partial"), live.write_bytes(b"partial")
    attribute(compose_config("attribute", BASE + ["method=further_training"]))
    assert not stale.exists() and live.exists()


# ------------------------------------------------------------------ integrity on load
def _flip_bit(path: Path, from_end: int = 9) -> None:
    """Flip one bit in the data section of a safetensors file (the header is at the start)."""
    data = bytearray(path.read_bytes())
    data[len(data) - from_end] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("what", ["final_model", "scores", "seed", "features_json"])
def test_a_flipped_bit_is_detected_on_load(runs, what):
    run = run_of(BASE)
    path = {"final_model": run.final_model, "scores": method_dir_of(BASE) / "scores.safetensors",
            "seed": seed_file(gold_dir_of(BASE), 1), "features_json": run.selection}[what]
    if what == "features_json":  # a digit changed in selection.json
        text = path.read_text()
        path.write_text(text.replace('"selection_seed": 0', '"selection_seed": 1'))
    else:
        _flip_bit(path)
    pattern = {"final_model": r"final model .* is damaged or truncated .*does not match the checksum"
                              r".*train.overwrite=true",
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
    path = method_dir_of(BASE) / "scores.safetensors"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(IntegrityError, match=r"scores.safetensors"):
        attribute(compose_config("attribute", BASE + ["method=grad_dot"]))
    path.unlink()  # the fix the message gives
    out = attribute(compose_config("attribute", BASE + ["method=grad_dot"]))
    assert torch.equal(load_tensors(out / "scores.safetensors")["scores"],
                       load_tensors(method_dir_of(BASE, "grad_dot") / "scores.safetensors")["scores"])


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_final_model(tiny, damage):
    run = train(compose_config("train", tiny))
    data = run.final_model.read_bytes()
    damaged = {"truncate": data[: len(data) // 2], "garbage": b"not a model" * 10, "empty": b""}[damage]
    run.final_model.write_bytes(damaged)
    for stage, fn in (("attribute", attribute), ("evaluate", evaluate), ("train", train)):
        with pytest.raises(IntegrityError, match=r"final model .* is damaged or truncated .*train.overwrite=true"):
            fn(compose_config(stage, tiny + (["method=grad_dot"] if stage == "attribute" else [])))
    if damage == "truncate":
        train(compose_config("train", tiny + ["train.overwrite=true"]))  # the fix the message gives works
        attribute(compose_config("attribute", tiny + ["method=grad_dot"]))


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


def test_non_finite_values_under_a_matching_checksum_are_refused_on_load(tiny, pipeline):
    """Another tool (or a bug) that writes inf together with a checksum that matches it: the seed
    file verifies, but further training never writes non-finite values, so it is refused on every
    load (the merge, and a re-run that would count it complete), never averaged in."""
    gold_dir = pipeline.gold_dir(further_training_key(compose_config("attribute", tiny)))
    t, header, _ = load_tensors_with_metadata(seed_file(gold_dir, 1))
    t["diff"][-1, 2, 3] = float("inf")
    safetensors.torch.save_file(t, str(seed_file(gold_dir, 1)),
                                metadata={"sha256": tensor_checksum(t), "json": json.dumps(header, sort_keys=True)})
    with pytest.raises(IntegrityError, match=r"seed_00001.safetensors holds non-finite values \(NaN/inf\) in diff "
                                             r"\(1 of .*delete it and re-run the further_train stage"):
        load_gold_standard(gold_dir)


def test_no_artifact_is_loaded_with_pickle():
    """Tensors go through safetensors and metadata through JSON; nothing in the package may
    unpickle (pickle, numpy with allow_pickle, torch.load but with weights_only=True, which
    reads tensors and plain containers only: the authors' index files, selection.left_out_file)."""
    import re

    banned = re.compile(r"torch\.load\((?![^)]*weights_only=True\))|\bpickle\.loads?\(|allow_pickle\s*=\s*True|"
                        r"joblib\.load\(|\bdill\.")
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in sorted((ROOT / "tda").rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if banned.search(line)]
    assert not hits, f"unpickling in {hits}"
