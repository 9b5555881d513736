"""The attribution problem: what every attribution method and the gold standard receive.

A neutral contract between the stages (which build it from a final model and its data) and
the methods and further training (which consume it). It holds the final model and its data
only: a method's settings are its own config, and further training receives the
`further_training` / `further_optimizer` settings from its stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from tda.artifacts import tensor_checksum
from tda.provenance import data_fingerprint, identity, selection_fingerprint
from tda.ranges import Range, format_bytes, physical_memory_bytes
from tda.sections import Checks, Section, setting


@dataclass(frozen=True)
class AttributionSettings(Section):
    """`attribution`: what every method and the gold standard share (AttributionProblem)."""

    PATH = "attribution"
    memory_budget_mb: float = setting(2048, "bound on per-example gradients (and stacked runs) held at once")
    target: Literal["test", "self"] = setting(
        "test", "whose loss is attributed: test = the evaluated test instances' (scores [n_test, n_left_out]); "
                "self = each training instance's own (self-influence [n_train], mislabel detection)")

    def check(self, c: Checks) -> None:
        c.positive("memory_budget_mb")
        total = physical_memory_bytes()
        why = f" MB, this machine's memory ({format_bytes(total)}): a budget the machine cannot hold bounds nothing"
        c.in_range("memory_budget_mb", Range(high=total // 2**20, why=why))


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
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    cache_dir: Path | None = None
    memory_budget_mb: float = 2048.0
    # identity of the final model this problem was built from (tda.provenance); set by the stages
    final_model: dict[str, str] | None = None

    def final_model_identity(self) -> dict[str, str]:
        """The final model's identity, or, for a problem built by hand, fingerprints of its
        content (trainable weights, data tensors, selection)."""
        if self.final_model is not None:
            return dict(self.final_model)
        weights = tensor_checksum({k: v for k, v in self.model.state_dict().items()})
        data = data_fingerprint(self.x_train, self.y_train, self.x_test, self.y_test)
        selection = selection_fingerprint(self.left_out_indices.tolist(), self.test_indices.tolist())
        return identity(weights, data, selection, run="in-memory problem")

    @property
    def n_train(self) -> int:
        return len(self.x_train)

    @property
    def x_left_out(self) -> torch.Tensor:
        return self.x_train[self.left_out_indices]

    @property
    def y_left_out(self) -> torch.Tensor:
        return self.y_train[self.left_out_indices]
