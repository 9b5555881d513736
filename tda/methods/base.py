"""What every attribution method receives and returns.

A method is configured by Hydra (`conf/method/<name>.yaml`, `_target_` = its class) and
called with an :class:`AttributionProblem`. It returns scores of shape
[n_test, n_left_out], oriented like the gold standard: positive = removing the training
instance raises the test loss = the instance is helpful.
"""

from __future__ import annotations

from typing import Any

import torch

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
