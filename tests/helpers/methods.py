"""A problem for the influence methods' solver tests, small enough for dense references."""

from __future__ import annotations

import torch
from torch import nn

from tda.problem import AttributionProblem


def untrained_mlp_problem() -> AttributionProblem:
    """An untrained 6-12-3 tanh MLP (123 parameters, float64) on 60 rows, the first 5 left out
    and the first 3 tested: its Hessian is indefinite (smallest eigenvalue ≈ −0.51, λ₀ ≈ 0.034),
    its Gauss–Newton is not."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 6, generator=g, dtype=torch.float64)
    y = (x @ torch.randn(6, 3, generator=g, dtype=torch.float64)).argmax(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).to(torch.float64)
    return AttributionProblem(model=model, task="classification", x_train=x, y_train=y, x_test=x[:3], y_test=y[:3],
                              left_out_indices=torch.arange(5), test_indices=torch.arange(3))
