"""Every numeric setting of conf/ at 0, −1, huge, NaN and ∞ (benchmarks/settings_faults.py
enumerates them from the composed configs: the plain sections and each option of every config
group): the pre-flight ends each in a refusal naming the setting or in acceptance, never in
another exception, and refuses NaN and ∞ everywhere."""

from __future__ import annotations

import pytest

from benchmarks.settings_faults import cases, preflight


@pytest.fixture(scope="module")
def rows():
    return preflight(cases())


@pytest.mark.slow
def test_every_numeric_setting_is_enumerated(rows):
    keys = {(tuple(r["context"]), r["key"]) for r in rows}
    assert len(keys) > 150  # the sections and every option's arguments, not a hand-written list
    for expected in [((), "further_training.n_seeds"), (("method=lissa",), "method.divergence_factor"),
                     (("method=trak",), "method.damping"), (("model=resnet9",), "model.width"),
                     ((), "dataset.split_seed")]:
        assert expected in keys


@pytest.mark.slow
def test_no_value_ends_in_an_exception_other_than_a_refusal(rows):
    errors = [(r["override"], r["message"]) for r in rows if r["preflight"] == "error"]
    assert not errors


@pytest.mark.slow
def test_nan_and_inf_are_refused_naming_the_setting(rows):
    for r in rows:
        if r["fault"] in ("nan", "inf"):
            assert r["preflight"] == "refused", r
            assert r["key"].split("[")[0] in r["message"], r


@pytest.mark.slow
def test_every_refusal_names_its_setting(rows):
    for r in rows:
        if r["preflight"] == "refused":
            assert r["key"].split("[")[0] in r["message"], r


@pytest.mark.slow
def test_huge_counts_are_refused(rows):
    """10¹² of an integer setting (epochs, seeds, sizes, iterations) is refused before anything
    runs, except where it means "all" (a row cap; a shard count, checked against the data once it
    is loaded) and LiSSA's scales (magnitudes written as integers: a huge one only converges slowly,
    and `scale: auto` takes the smallest that converges)."""
    not_counts = {"dataset.max_train", "dataset.max_test", "further_training.left_out_shard.count", "method.scales"}
    accepted = [r["override"] for r in rows if r["fault"] == "huge" and r["kind"] == "int"
                and r["preflight"] == "accepted" and r["key"].split("[")[0] not in not_counts]
    assert not accepted
