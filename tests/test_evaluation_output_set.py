"""The evaluate stage's files are one set (tda.evaluation.output_set): a failing or killed evaluate
(a real SIGKILL) leaves the previous complete set byte-identical — never a mix of two evaluations,
never a truncated file — and the next evaluate cleans up after it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from helpers.config import CONF, ROOT, compose_config
from helpers.evaluation import COMPARE
from matplotlib.figure import Figure

from tda.evaluation.output_set import remove_stale_sets
from tda.stages import attribute, evaluate, train

# The files a tiny evaluate writes (tabular data: no example images).
EVAL_FILES = {"similarity.csv", "similarity.png", "reliability.csv", "seed_windows.csv", "seed_windows.png",
              "sorted_scores.csv", "sorted_scores.png", "agreement.csv", "agreement.png", "examples.csv",
              "examples.md", "summary.csv", "topk.csv", "report.md", "evaluated.json", "adjustment.csv",
              "adjustment.png", "distance.csv", "distance.png", "class_structure.csv", "class_structure.png",
              "undefined.csv"}


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _evaluated_once_then_a_third_method(tiny, compare: bool = False) -> tuple:
    """Train, the gold standard, grad_dot; evaluate (the previous set); then grad_cos, so that
    the next evaluate would write a different set (two methods instead of one). With
    `compare`, the evaluation is compare mode's (one experiment: the current overrides)."""
    train(compose_config("train", tiny))
    for method in ("further_training", "grad_dot"):
        attribute(compose_config("attribute", tiny + [f"method={method}"]))
    cfg = compose_config("evaluate", tiny + (COMPARE if compare else []))
    out = evaluate(cfg, tiny + COMPARE) if compare else evaluate(cfg)
    if not compare:
        assert {p.name for p in out.iterdir()} == EVAL_FILES - {"agreement.png"}  # one method: nothing to agree with
    attribute(compose_config("attribute", tiny + ["method=grad_cos"]))
    return cfg, out, _files(out)


def _assert_new_full_set(out: Path) -> None:
    """Every file of the set is there and every table names both methods."""
    assert {p.name for p in out.iterdir()} == EVAL_FILES
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no staging / set-aside directory left
    for name in ("similarity", "summary", "seed_windows"):
        assert set(pd.read_csv(out / f"{name}.csv").method) == {"grad_dot", "grad_cos"}, name
    assert "grad_cos" in (out / "report.md").read_text()


# ------------------------------------------------------------------ a failing evaluate
@pytest.mark.slow
def test_evaluate_failing_midway_keeps_the_previous_set(tiny, monkeypatch):
    cfg, out, before = _evaluated_once_then_a_third_method(tiny)
    real, calls = Figure.savefig, []

    def fail_on_third(self, *args, **kwargs):  # matplotlib's savefig: the disk fills up at the third figure
        calls.append(args)
        if len(calls) == 3:
            raise OSError("No space left on device (injected)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", fail_on_third)
    with pytest.raises(OSError, match="injected"):
        evaluate(cfg)
    assert all(Path(a[0]).parent.name.startswith(f".{out.name}.staging-") for a in calls)  # plots go to staging
    assert _files(out) == before  # byte-identical: no new CSV beside an old report
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # its staging directory removed
    monkeypatch.setattr(Figure, "savefig", real)
    old_umask = os.umask(0o022)
    try:
        assert evaluate(cfg) == out
    finally:
        os.umask(old_umask)
    _assert_new_full_set(out)
    # the swapped-in set has the umask's permissions (not a private temp directory's 0700 / 0600)
    assert out.stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {name: 0o644 for name in EVAL_FILES}


@pytest.mark.slow
def test_compare_failing_at_its_figure_keeps_the_previous_set(tiny, monkeypatch):
    cfg, out, before = _evaluated_once_then_a_third_method(tiny, compare=True)
    assert out.parent.name == "compare" and set(before) == {"similarity.csv", "reliability.csv", "summary.csv",
                                                              "undefined.csv", "similarity.png", "report.md"}
    real = Figure.savefig

    def fail(self, *args, **kwargs):  # the figure is written after the three CSVs
        raise OSError("No space left on device (injected)")

    monkeypatch.setattr(Figure, "savefig", fail)
    with pytest.raises(OSError, match="injected"):
        evaluate(cfg, tiny + COMPARE)
    assert _files(out) == before  # not the new similarity.csv (two methods) beside the old report
    assert [p.name for p in out.parent.iterdir()] == [out.name]
    monkeypatch.setattr(Figure, "savefig", real)
    assert evaluate(cfg, tiny + COMPARE) == out
    assert set(pd.read_csv(out / "similarity.csv").method) == set(pd.read_csv(out / "summary.csv").method) \
        == {"grad_dot", "grad_cos"}
    assert "grad_cos" in (out / "report.md").read_text() and (out / "similarity.png").stat().st_size > 0


# ------------------------------------------------------------------ a killed evaluate (real SIGKILL)
KILLED_EVALUATE = """
import os, signal, sys
from hydra import compose, initialize_config_dir
from matplotlib.figure import Figure
from tda.stages import evaluate

calls = []
real_savefig, real_rename = Figure.savefig, os.rename

def savefig(self, *args, **kwargs):
    calls.append(1)
    if WHERE == "savefig" and len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # killed while writing the second figure
    return real_savefig(self, *args, **kwargs)

def rename(src, dst, *args, **kwargs):
    if WHERE == "swap" and ".staging-" in str(src):
        os.kill(os.getpid(), signal.SIGKILL)  # killed between moving the old set aside and the new one in
    return real_rename(src, dst, *args, **kwargs)

Figure.savefig, os.rename = savefig, rename
with initialize_config_dir(config_dir=CONF, version_base="1.3"):
    cfg = compose(config_name="evaluate", overrides=OVERRIDES)
evaluate(cfg)
"""


def _killed_evaluate(tiny, where: str) -> subprocess.CompletedProcess:
    script = f"WHERE = {where!r}\nCONF = {str(CONF)!r}\nOVERRIDES = {tiny!r}\n" + textwrap.dedent(KILLED_EVALUATE)
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_evaluate_killed_while_writing_keeps_the_previous_set(tiny):
    cfg, out, before = _evaluated_once_then_a_third_method(tiny)
    proc = _killed_evaluate(tiny, "savefig")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert _files(out) == before
    staging = [p for p in out.parent.iterdir() if p != out]
    assert len(staging) == 1 and staging[0].name.startswith(f".{out.name}.staging-")
    assert (staging[0] / "similarity.png").is_file()  # it was killed mid-set, after the first figure
    # the next evaluate removes the leftover and writes a complete new set
    assert evaluate(cfg) == out
    _assert_new_full_set(out)


@pytest.mark.slow
def test_evaluate_killed_during_the_swap_loses_nothing(tiny):
    cfg, out, before = _evaluated_once_then_a_third_method(tiny)
    proc = _killed_evaluate(tiny, "swap")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert not out.exists()  # the documented instant: the previous set is aside, the new one not yet in
    # the next evaluate's clean-up puts the previous complete set back before anything else
    remove_stale_sets(out)
    assert _files(out) == before
    assert [p.name for p in out.parent.iterdir()] == [out.name]
    assert evaluate(cfg) == out
    _assert_new_full_set(out)
