"""The evaluate stage's progress (tda.evaluation.progress): every step is logged with its time."""

from __future__ import annotations

import logging

from tda.evaluation.progress import Steps


def test_every_step_is_logged_with_its_time(caplog):
    steps = Steps("evaluate")
    with caplog.at_level(logging.INFO, logger="tda.evaluation"):
        with steps.step("loading", "the gold standard"):
            pass
        with steps.step("seed windows"):
            pass
    assert [r.getMessage() for r in caplog.records] == ["evaluate: loading (the gold standard)",
                                                        "evaluate: seed windows"]
    assert list(steps.seconds) == ["loading", "seed windows"] and all(s >= 0 for s in steps.seconds.values())
    assert steps.timings().startswith(f"{sum(steps.seconds.values()):.1f} s (loading ")
