"""Grad-Dot and Grad-Cos (docs/method.md §3.1): gᵀgⱼ and its cosine-normalised variant, exact (no
projection). Only the evaluated test instances and the left-out instances need gradients;
for models whose trainable parameters are all linear layers the inner products are formed
from the factors (activations · output gradients) without materialising any gradient."""

from __future__ import annotations

import torch

from tda.exits import RefusedError
from tda.methods.base import Method
from tda.methods.checks import check_factored, positive_int
from tda.methods.gradients import compute_grads, iter_grad_chunks, loss_target, tensor_kernels, tensor_sq_norms
from tda.problem import AttributionProblem


class GradDot(Method):
    """score(z, j) = ∇loss(z)ᵀ∇loss(z_j) [n_test, n_left_out]: the first-order (one SGD step)
    change of z's loss when z_j is removed, up to the positive factor lr/n — positive =
    removing j raises z's loss = helpful, as the gold standard."""

    def __init__(self, chunk_size: int = 256, normalize: bool = False, factored: str | bool = "auto"):
        super().__init__()
        self.chunk_size = positive_int("chunk_size", chunk_size, "rows per per-example-gradient chunk", 256)
        self.normalize = normalize
        self.factored = check_factored(factored)

    def scores(self, problem: AttributionProblem) -> torch.Tensor:
        target = loss_target(problem.task)
        g_test = compute_grads(problem.model, problem.x_test, problem.y_test, target, self.factored, self.chunk_size)
        g_lo = compute_grads(problem.model, problem.x_left_out, problem.y_left_out, target, self.factored,
                             self.chunk_size)
        self.record["factored"] = type(g_test).__name__ == "FactoredGrads"
        s = sum(tensor_kernels(g_test, g_lo).values())
        if self.normalize:
            n_test = sum(tensor_sq_norms(g_test).values()).sqrt().clamp_min(1e-30)
            n_lo = sum(tensor_sq_norms(g_lo).values()).sqrt().clamp_min(1e-30)
            s = s / n_test[:, None] / n_lo[None, :]
        return s

    def self_influence(self, problem: AttributionProblem) -> torch.Tensor:
        """‖∇loss(z_i)‖² [n_train], streamed over the training set within the memory budget (from
        the factors of linear layers where possible: ‖b aᵀ‖² = ‖a‖²‖b‖²)."""
        out = torch.empty(problem.n_train, dtype=torch.float64)
        for rows, g in iter_grad_chunks(problem.model, problem.x_train, problem.y_train, loss_target(problem.task),
                                        problem.memory_budget_mb, self.factored):
            out[rows] = sum(tensor_sq_norms(g).values()).double().cpu()
        self.record["factored"] = type(g).__name__ == "FactoredGrads"
        return out


class GradCos(GradDot):
    """gᵀgⱼ / (‖g‖‖gⱼ‖) [n_test, n_left_out]."""

    def __init__(self, chunk_size: int = 256, factored: str | bool = "auto"):
        super().__init__(chunk_size=chunk_size, normalize=True, factored=factored)

    def self_influence(self, problem: AttributionProblem) -> torch.Tensor:
        raise RefusedError("grad_cos has no self-influence to rank by: the cosine of a gradient with itself is 1 for "
                           "every training instance, so every instance would tie. Use method=grad_dot (‖g‖², the "
                           "same gradients unnormalised) for self-influence")
