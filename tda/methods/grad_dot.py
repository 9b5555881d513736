"""Grad-Dot and Grad-Cos (SPEC §3): gᵀgⱼ and its cosine-normalised variant."""

from __future__ import annotations

import torch

from tda.methods.base import AttributionProblem, Method
from tda.methods.gradients import per_example_grads


class GradDot(Method):
    """score(z, j) = ∇loss(z)ᵀ∇loss(z_j): the first-order (one SGD step) change of z's loss
    when z_j is removed, up to the positive factor lr/n."""

    name = "grad_dot"

    def __init__(self, chunk_size: int = 256, normalize: bool = False):
        super().__init__()
        self.chunk_size = chunk_size
        self.normalize = normalize

    def scores(self, problem: AttributionProblem) -> torch.Tensor:
        g_test = per_example_grads(problem.model, problem.x_test, problem.y_test, problem.task, self.chunk_size)
        g_lo = per_example_grads(problem.model, problem.x_left_out, problem.y_left_out, problem.task, self.chunk_size)
        if self.normalize:
            g_test = g_test / g_test.norm(dim=1, keepdim=True).clamp_min(1e-30)
            g_lo = g_lo / g_lo.norm(dim=1, keepdim=True).clamp_min(1e-30)
        return g_test @ g_lo.T


class GradCos(GradDot):
    name = "grad_cos"

    def __init__(self, chunk_size: int = 256):
        super().__init__(chunk_size=chunk_size, normalize=True)
