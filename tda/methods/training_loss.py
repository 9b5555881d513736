"""The plain baseline of self-influence: each training instance's own loss at the final model
(docs/methods.md, "Self-influence"). A mislabelled instance is one the model fits badly, so its
loss alone already ranks it high; a method's self-influence is worth its cost only where it ranks
flipped labels better than this."""

from __future__ import annotations

import torch

from tda.exits import RefusedError
from tda.methods.base import Method
from tda.methods.checks import positive_int
from tda.models.base import per_example_loss
from tda.problem import AttributionProblem


class TrainingLoss(Method):
    """loss(z_i, θᶠ) [n_train] as self-influence, in batches of `batch_size` rows; no pairwise scores."""

    def __init__(self, batch_size: int = 1024):
        super().__init__()
        self.batch_size = positive_int("batch_size", batch_size, "training rows per forward pass", 1024)

    def scores(self, problem: AttributionProblem) -> torch.Tensor:
        raise RefusedError("method=loss is the baseline of self-influence (each training instance's own loss) and "
                           "scores no test instance against a training instance; run it with "
                           "attribution.target=self")

    @torch.no_grad()
    def self_influence(self, problem: AttributionProblem) -> torch.Tensor:
        model = problem.model.eval()
        device = next(model.parameters()).device
        losses = [per_example_loss(model(problem.x_train[r:r + self.batch_size].to(device)),
                                   problem.y_train[r:r + self.batch_size].to(device), problem.task)
                  for r in range(0, problem.n_train, self.batch_size)]
        return torch.cat(losses).double().cpu()
