"""The attribution problem (tda.problem): what the gold standard and every method receive, and
nothing that belongs to only one of them."""

from __future__ import annotations

import dataclasses

from tda.problem import AttributionProblem


def test_attribution_problem_carries_no_further_training_settings():
    fields = {f.name for f in dataclasses.fields(AttributionProblem)}
    assert not fields & {"further_training", "further_optimizer"}
