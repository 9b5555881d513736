"""The choice of left-out and test instances (tda.selection): more instances than the data has are
refused before training; an edited selection.json is refused naming the index and the file."""

from __future__ import annotations

import json

import pytest
from helpers.config import compose_config
from helpers.runs import no_run_dir

from tda.config import ConfigError
from tda.selection import validate_indices
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
