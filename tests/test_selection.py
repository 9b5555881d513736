"""The choice of left-out and test instances (tda.selection): more instances than the data has are
refused before training; an edited selection.json is refused naming the index and the file."""

from __future__ import annotations

import hashlib
import json
from fractions import Fraction

import pytest
import torch
from helpers.config import compose_config
from helpers.runs import no_run_dir
from omegaconf import OmegaConf

from tda.config import ConfigError
from tda.runs import RunDir, run_key
from tda.selection import SelectionSettings, validate_indices
from tda.stages import attribute, train


def test_more_left_out_instances_than_training_rows(tiny):
    cfg = compose_config("train", tiny + ["selection.n_left_out=500"])  # TINY keeps 96 training rows
    with pytest.raises(ConfigError, match=r"selection.n_left_out=500 asks for more left-out instances than the 96 "
                                          r"training rows of breast_cancer; lower it"):
        train(cfg)
    assert no_run_dir(cfg)


def test_more_test_instances_than_test_rows(tiny):
    cfg = compose_config("train", tiny + ["selection.n_test=41"])  # TINY keeps 40 test rows
    with pytest.raises(ConfigError, match=r"selection.n_test=41 asks for more test instances than the 40"):
        train(cfg)


# ------------------------------------------------------------------ selection.json edited
@pytest.mark.parametrize("edit, expect", [
    (lambda s: s["left_out_indices"].__setitem__(0, -1), r"index -1 \(entry 0\) is outside 0\.\.95"),
    (lambda s: s["left_out_indices"].__setitem__(1, s["left_out_indices"][0]), r"index \d+ appears twice \(entry 1\)"),
    (lambda s: s["test_indices"].__setitem__(2, 40), r"index 40 \(entry 2\) is outside 0\.\.39"),
    (lambda s: s["test_indices"].__setitem__(0, 1.0), r"entry 0 is 1\.0 \(float\), not an integer row index"),
    (lambda s: s["test_indices"].__setitem__(0, True), r"entry 0 is True \(bool\), not an integer row index"),
], ids=["negative", "duplicate", "out-of-range", "float", "bool"])
def test_edited_selection_is_refused_naming_index_and_file(tiny, edit, expect):
    """Edited and re-saved with a valid checksum (as a script rewriting it would): each bad
    index is named with the file before any method runs."""
    from tda.artifacts import CHECKSUM_KEY, save_json

    run = train(compose_config("train", tiny))
    selection = {k: v for k, v in json.loads(run.selection.read_text()).items() if k != CHECKSUM_KEY}
    edit(selection)
    save_json(run.selection, selection)
    with pytest.raises(ValueError, match=rf"{expect}.*; restore .*selection\.json as train\.py wrote it"):
        attribute(compose_config("attribute", tiny + ["method=grad_dot"]))
    assert not list((run.path / "methods").rglob("scores.safetensors"))


def test_validate_indices_accepts_a_clean_selection_and_names_the_source():
    assert validate_indices([0, 5, 3], 6, "test indices", "sel.json") == [0, 5, 3]
    with pytest.raises(ValueError, match=r"test indices in sel\.json: index 6 \(entry 1\) is outside 0\.\.5 .*"
                                         r"train\.overwrite=true"):
        validate_indices([0, 6], 6, "test indices", "sel.json")


# ------------------------------------------------------------------ left-out rules: file, every k-th
def _selection(run) -> dict:
    return json.loads(run.selection.read_text())


@pytest.mark.parametrize("kind", ["json", "json_object", "tensor"])
def test_left_out_file_is_read_in_order_with_repeats_kept_once(tiny, tmp_path, kind):
    """The authors publish their left-out indices as torch tensor files; a JSON list works too.
    A repeated index is left out once, at its first position, and the file is recorded."""
    listed = [17, 3, 40, 3, 95, 17, 0]
    if kind == "tensor":
        path = tmp_path / "left_out.pt"
        torch.save(torch.tensor(listed), path)
    else:
        path = tmp_path / "left_out.json"
        path.write_text(json.dumps(listed if kind == "json" else {"left_out_indices": listed}))
    run = train(compose_config("train", tiny + [f"selection.left_out_file={path}", "selection.n_left_out=null"]))
    selection = _selection(run)
    assert selection["left_out_indices"] == [17, 3, 40, 95, 0]
    record = selection["left_out_file"]
    assert record["n_entries"] == 7 and record["n_repeats_dropped"] == 2
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_left_out_file_takes_the_first_n_left_out(tiny, tmp_path):
    path = tmp_path / "left_out.json"
    path.write_text(json.dumps([9, 8, 7, 6, 5]))
    run = train(compose_config("train", tiny + [f"selection.left_out_file={path}", "selection.n_left_out=3"]))
    assert _selection(run)["left_out_indices"] == [9, 8, 7]
    with pytest.raises(ConfigError, match=r"selection.n_left_out=6 asks for more left-out instances than "
                                          r"selection.left_out_file=.*\(5 distinct indices\)"):
        train(compose_config("train", tiny + [f"selection.left_out_file={path}", "selection.n_left_out=6"]))


def test_left_out_file_content_defines_the_run(tiny, tmp_path):
    """The run directory follows the file's content, not its path: an edited file is another run."""
    path = tmp_path / "left_out.json"
    path.write_text("[1, 2, 3]")
    overrides = tiny + [f"selection.left_out_file={path}", "selection.n_left_out=null"]
    first = RunDir.from_config(compose_config("train", overrides))
    moved = tmp_path / "moved.json"
    moved.write_text("[1, 2, 3]")
    assert RunDir.from_config(compose_config("train", tiny + [f"selection.left_out_file={moved}",
                                                              "selection.n_left_out=null"])) == first
    path.write_text("[1, 2, 4]")
    assert RunDir.from_config(compose_config("train", overrides)) != first


@pytest.mark.parametrize("content, expect", [
    ("[1, 2.5]", r"entry 2\.5 \(float\) is not an integer row index"),
    ("[1, 96]", r"1 indices lie outside 0\.\.95 \(the 96 training rows\), e\.g\. 96"),
    ("{\"other\": [1]}", r"holds NoneType, not a non-empty list of row indices"),
    ("not json", r"is not valid JSON"),
    (None, r"does not exist"),
], ids=["float", "out-of-range", "no-list", "not-json", "missing"])
def test_bad_left_out_file_is_refused(tiny, tmp_path, content, expect):
    path = tmp_path / "left_out.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises((ConfigError, FileNotFoundError), match=expect):
        train(compose_config("train", tiny + [f"selection.left_out_file={path}", "selection.n_left_out=null"]))
    assert not list((tmp_path / "runs").rglob("final_model.safetensors"))


def test_a_pickled_object_in_a_tensor_file_is_refused(tiny, tmp_path):
    """weights_only=True: a torch file holding anything but tensors and plain containers is refused."""
    path = tmp_path / "left_out.pt"
    torch.save({"indices": torch.tensor([1, 2]), "why": Fraction(1, 3)}, path)
    with pytest.raises(ConfigError, match=r"cannot be read as a torch tensor file with weights_only=True"):
        train(compose_config("train", tiny + [f"selection.left_out_file={path}", "selection.n_left_out=null"]))
    float_path = tmp_path / "floats.pt"
    torch.save(torch.tensor([1.0, 2.0]), float_path)
    with pytest.raises(ConfigError, match=r"expected a 1-D tensor of integer row indices"):
        train(compose_config("train", tiny + [f"selection.left_out_file={float_path}", "selection.n_left_out=null"]))


def test_left_out_every_kth_row(tiny):
    run = train(compose_config("train", tiny + ["selection.left_out_every=9", "selection.n_left_out=5"]))
    assert _selection(run)["left_out_indices"] == [0, 9, 18, 27, 36]
    with pytest.raises(ConfigError, match=r"set one of them to null"):
        compose_and_check = compose_config("train", tiny + ["selection.left_out_every=9", "selection.left_out_file=x"])
        SelectionSettings.from_config(compose_and_check.selection)


def test_new_selection_keys_at_their_defaults_keep_existing_run_directories(tiny):
    """Runs trained before left_out_every / left_out_file / train.final_checkpoint existed keep
    their directory: at the defaults those keys are not part of the run key."""
    cfg = compose_config("train", tiny)
    OmegaConf.set_struct(cfg, False)
    for key in ("left_out_every", "left_out_file"):
        del cfg.selection[key]
    del cfg.train["final_checkpoint"]
    assert run_key(cfg) == run_key(compose_config("train", tiny))
    assert run_key(compose_config("train", tiny + ["train.final_checkpoint=best_loss"])) != run_key(cfg)
