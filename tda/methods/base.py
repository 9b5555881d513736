"""What every attribution method receives and returns.

A method is configured by Hydra (`conf/method/<name>.yaml`, `_target_` = its class) and
called with an :class:`AttributionProblem`. It returns scores of shape
[n_test, n_left_out], oriented like the gold standard: positive = removing the training
instance raises the test loss = the instance is helpful.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn


@dataclass
class AttributionProblem:
    """The final model reduced to what attribution needs.

    `model` is the trainable part of the final model (the frozen part, if any, has already
    been applied: `x_train` / `x_test` are its cached outputs). Shapes:
      x_train [n_train, ...], y_train [n_train]          the whole training set
      x_test [n_test, ...], y_test [n_test]              the evaluated test instances
      left_out_indices [n_left_out]                      rows of x_train being attributed
      test_indices [n_test]                              rows of the dataset's test split
    """

    model: nn.Module
    task: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    left_out_indices: torch.Tensor
    test_indices: torch.Tensor
    further_training: DictConfig | None = None
    further_optimizer: DictConfig | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    cache_dir: Path | None = None
    memory_budget_mb: float = 2048.0

    @property
    def n_train(self) -> int:
        return len(self.x_train)

    @property
    def x_left_out(self) -> torch.Tensor:
        return self.x_train[self.left_out_indices]

    @property
    def y_left_out(self) -> torch.Tensor:
        return self.y_train[self.left_out_indices]


class Method:
    """Base class of gradient-based methods. Subclasses implement :meth:`scores`; anything
    worth recording with the scores (damping values, iterations, ...) goes into
    `self.record`."""

    name: str = "method"

    def __init__(self) -> None:
        self.record: dict[str, Any] = {}

    def scores(self, problem: AttributionProblem) -> torch.Tensor:
        """[n_test, n_left_out], positive = helpful."""
        raise NotImplementedError
