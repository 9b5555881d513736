"""What every attribution method receives and returns.

A method is configured by Hydra (`conf/method/<name>.yaml`, `_target_` = its class) and
called with an :class:`AttributionProblem`. It returns scores of shape
[n_test, n_left_out], oriented like the gold standard: positive = removing the training
instance raises the test loss = the instance is helpful; and, for mislabel detection, the
self-influence of every training instance [n_train] (docs/methods.md, "Self-influence").
"""

from __future__ import annotations

from typing import Any

import torch

from tda.methods.self_influence import diagonal_of_scores
from tda.problem import AttributionProblem


class Method:
    """Base class of gradient-based methods. Subclasses implement :meth:`scores`; anything
    worth recording with the scores (damping values, iterations, ...) goes into
    `self.record`."""

    def __init__(self) -> None:
        self.record: dict[str, Any] = {}

    def scores(self, problem: AttributionProblem) -> torch.Tensor:
        """[n_test, n_left_out], positive = helpful."""
        raise NotImplementedError

    def self_influence(self, problem: AttributionProblem) -> torch.Tensor:
        """τ(z_i, z_i) [n_train] float64 for every training row i: the method's score of the
        instance against itself (as test instance and as left-out instance), how much the
        instance supports its own loss. By default the diagonal of :meth:`scores` on blocks of
        training rows (tda.methods.self_influence); a method with a cheaper form overrides it,
        and one without a meaningful self-influence refuses (RefusedError) saying why."""
        return diagonal_of_scores(self, problem)
