"""Grad-Dot for Adam further training (beyond the paper; docs/method.md §3.8 "natural extensions").

Derivation. Further training restarts Adam from θᶠ with fresh state (m_0 = v_0 = 0). At
step t with minibatch gradient g_t = (1/|b_t|) Σ_{i∈b_t} ∇loss(z_i, θ_{t−1}):

    m_t = β₁ m_{t−1} + (1 − β₁) g_t,        m̂_t = m_t / (1 − β₁ᵗ)
    v_t = β₂ v_{t−1} + (1 − β₂) g_t²,       v̂_t = v_t / (1 − β₂ᵗ)
    θ_t = θ_{t−1} − η m̂_t / (√v̂_t + ε)

Bias correction makes m̂_t and v̂_t weighted *averages* (weights summing to one) of the past
g_s and g_s². With the tiny learning rates of further training θ stays at θᶠ to first order,
so the g_s are minibatch gradients at θᶠ and v̂_t concentrates on their second moment

    v = E[g_b²] = ḡ² + (S² / B)(1 − B/n)        (elementwise)

where ḡ = (1/n) Σ_i g_i, S² = (1/(n−1)) Σ_i (g_i − ḡ)² are the mean and sample variance of
the per-example training gradients at θᶠ, B the further-training batch size, and (1 − B/n)
the finite-population correction of batches drawn without replacement. Treating the
denominator as this fixed preconditioner D = diag(1 / (√v + ε)) — removing one of n
instances changes v by O(1/n) and enters the update only through m̂_t·∂(1/√v̂), which is
small next to the direct term when |ḡ| ≪ √v (noise-dominated gradients near convergence) —
Adam is preconditioned SGD with momentum: θ_t − θ_{t−1} = −η D m̂_t. Removing z_j from
the training set changes each batch holding it by −(1/B)(g_j − ḡ_b); summed over a further-
training run the momentum average passes each change through with total weight one, so to
first order in η the change of a test loss is

    Δloss(z) ≈ (η · steps · (1/n)) · ∇loss(z)ᵀ D g_j  − (a term that does not depend on j)

and the score (positive = helpful, like the gold standard) is

    score(z, j) = ∇loss(z)ᵀ diag(1 / (√v + ε)) ∇loss(z_j).

With a huge ε this reduces to Grad-Dot / ε; with ε → 0 and B = n (full batch) it is a
sign-like rescaling by 1/|ḡ|. The ε and the batch size default to the configured further
training (`further_optimizer.eps`, `further_training.batch_size`). The first few steps are
the exception (v̂_1 = g_1² exactly, so the very first update is sign descent); the score
describes the behaviour once v̂ has averaged over several batches.
"""

from __future__ import annotations

import torch

from tda.config import ConfigError
from tda.exits import RefusedError
from tda.methods.base import Method
from tda.methods.checks import check_factored, non_negative, optional_positive_int, positive_int
from tda.methods.gradients import compute_grads, iter_grad_chunks, loss_target, tensor_moments
from tda.methods.layout import ParamLayout
from tda.problem import AttributionProblem


def adam_second_moment(sum_g: torch.Tensor, sum_g2: torch.Tensor, n: int, batch_size: int) -> torch.Tensor:
    """E[g_b²] of a minibatch mean gradient of `batch_size` examples drawn without replacement
    from n, from Σ_i g_i and Σ_i g_i² (elementwise) over the training set."""
    mean = sum_g / n
    b = min(int(batch_size), n)
    if n < 2 or b >= n:
        return mean.pow(2)
    sample_var = ((sum_g2 - n * mean.pow(2)) / (n - 1)).clamp_min(0)
    return mean.pow(2) + sample_var / b * (1 - b / n)


class GradDotAdam(Method):
    """score(z, j) = ∇loss(z)ᵀ diag(1/(√v + ε)) ∇loss(z_j) [n_test, n_left_out]; see the module
    docstring. `eps` / `batch_size`: Adam's ε and the batch size of further training, which
    conf/method/grad_dot_adam.yaml reads from `further_optimizer.eps` and
    `further_training.batch_size`; null (no Adam further optimizer) is refused when scoring."""

    def __init__(self, eps: float | None = None, batch_size: int | None = None, factored: str | bool = "auto",
                 chunk_size: int = 256, max_train_rows_per_chunk: int | None = None):
        super().__init__()
        if eps is not None:
            non_negative("eps", eps, "Adam's ε, or null to read further_optimizer.eps", 1e-8)
        self.eps = eps
        self.batch_size = optional_positive_int("batch_size", batch_size, "rows per further-training batch", 16)
        self.factored = check_factored(factored)
        self.chunk_size = positive_int("chunk_size", chunk_size, "rows per per-example-gradient chunk", 256)
        self.max_rows = optional_positive_int("max_train_rows_per_chunk", max_train_rows_per_chunk,
                                              "training rows per chunk", 1024)

    def settings(self) -> tuple[float, int]:
        eps, bs = self.eps, self.batch_size
        if eps is None:
            raise RefusedError("method=grad_dot_adam needs Adam's ε: set method.eps, or use "
                             "further_optimizer=adam (its eps is read from there)")
        if bs is None:
            raise RefusedError("method=grad_dot_adam needs the further-training batch size: set "
                             "method.batch_size or further_training.batch_size")
        if float(eps) < 0 or int(bs) <= 0:
            raise ConfigError(f"method=grad_dot_adam: eps={eps} must be >= 0 and batch_size={bs} positive")
        return float(eps), int(bs)

    def preconditioner(self, problem: AttributionProblem) -> dict[str, torch.Tensor]:
        """Per trainable tensor, 1/(√v + ε) flattened [size_l], float64."""
        eps, bs = self.settings()
        model, target = problem.model, loss_target(problem.task)
        layout = ParamLayout.of(model)
        dev = next(model.parameters()).device
        s1 = {k: torch.zeros(n, dtype=torch.float64, device=dev) for k, n in zip(layout.names, layout.sizes)}
        s2 = {k: torch.zeros(n, dtype=torch.float64, device=dev) for k, n in zip(layout.names, layout.sizes)}
        for _, g in iter_grad_chunks(model, problem.x_train, problem.y_train, target, problem.memory_budget_mb / 2,
                                     self.factored, self.max_rows):
            a, b = tensor_moments(g)
            for k in layout.names:
                s1[k] += a[k].double()
                s2[k] += b[k].double()
        v = {k: adam_second_moment(s1[k], s2[k], problem.n_train, bs) for k in layout.names}
        self.record.update({"eps": eps, "batch_size": bs,
                            "sqrt_v_median": float(torch.cat(list(v.values())).sqrt().median())})
        return {k: 1.0 / (v[k].sqrt() + eps) for k in layout.names}

    def scores(self, problem: AttributionProblem) -> torch.Tensor:
        D = self.preconditioner(problem)
        target = loss_target(problem.task)
        g_test = compute_grads(problem.model, problem.x_test, problem.y_test, target, self.factored, self.chunk_size)
        g_lo = compute_grads(problem.model, problem.x_left_out, problem.y_left_out, target, self.factored,
                             self.chunk_size)
        total = torch.zeros(len(g_test), len(g_lo), dtype=torch.float64, device=next(problem.model.parameters()).device)
        for k in g_test.tensor_names:
            total += (g_test.block(k).double() * D[k]) @ g_lo.block(k).double().T
        return total
