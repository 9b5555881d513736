"""DataInf (Kwon et al. 2024; docs/method.md §3.6), vectorised.

Per trainable parameter tensor l, DataInf replaces the inverse of the damped empirical
Fisher block, ((1/n) Σ_i g_{i,l} g_{i,l}ᵀ + λ_l I)⁻¹, by the average of the rank-one
inverses, (1/n) Σ_i (g_{i,l} g_{i,l}ᵀ + λ_l I)⁻¹, each given by Sherman–Morrison:

    score(z, j) = Σ_l (1/λ_l) [ g_lᵀg_{j,l} − (1/n) Σ_i (g_lᵀg_{i,l})(g_{i,l}ᵀg_{j,l}) / (λ_l + ‖g_{i,l}‖²) ]

with λ_l = mean_i mean(g_{i,l}²) / c (the authors' `lambda_const_param`, c = 10). The sign is
the gold standard's: positive = helpful. The authors loop over training instances in
Python; here, per tensor, with C_l = G_test,l G_train,lᵀ [n_test, n_train],
D_l = G_train,l G_lo,lᵀ [n_train, n_lo] and r_l = λ_l + ‖g_{i,l}‖² [n_train]:

    score = Σ_l (1/λ_l) [ G_test,l G_lo,lᵀ − C_l diag(1/r_l) D_l / n ]

a few matrix products per training chunk. With linear layers, C_l and D_l come from the
factored kernels (no gradient is materialised).
"""

from __future__ import annotations

import torch

from tda.config import ConfigError
from tda.exits import RefusedError
from tda.methods.base import Method
from tda.methods.checks import check_factored, optional_positive_int, positive_int
from tda.methods.gradients import compute_grads, iter_grad_chunks, loss_target, tensor_kernels, tensor_sq_norms
from tda.methods.layout import ParamLayout
from tda.problem import AttributionProblem


class DataInf(Method):
    """`c`: λ_l = mean_i mean(g_{i,l}²) / c. `damping`: a fixed λ for every block instead
    (as dattri's `regularization`). `blocks`: "tensor" (the paper's: one block per parameter tensor)
    or "module" (weight and bias of a layer together, as dattri groups them). Scores
    [n_test, n_left_out]."""

    def __init__(self, c: float = 10.0, damping: float | None = None, factored: str | bool = "auto",
                 chunk_size: int = 256, max_train_rows_per_chunk: int | None = None, blocks: str = "tensor"):
        super().__init__()
        if blocks not in ("tensor", "module"):
            raise ConfigError(f"method.blocks={blocks!r} must be 'tensor' or 'module'")
        self.blocks = blocks
        if c <= 0:
            raise ConfigError(f"method.c={c} must be positive (λ_l = mean squared gradient / c)")
        if damping is not None and damping <= 0:
            raise ConfigError(f"method.damping={damping} must be positive or null (null: λ_l from method.c)")
        self.c = float(c)
        self.damping = damping
        self.factored = check_factored(factored)
        self.chunk_size = positive_int("chunk_size", chunk_size, "rows per per-example-gradient chunk", 256)
        self.max_rows = optional_positive_int("max_train_rows_per_chunk", max_train_rows_per_chunk,
                                              "training rows per chunk", 1024)

    def groups(self, layout: ParamLayout) -> dict[str, list[str]]:
        """Block name -> parameter tensors in it, and sizes."""
        out: dict[str, list[str]] = {}
        for name in layout.names:
            key = name if self.blocks == "tensor" else name.rsplit(".", 1)[0]
            out.setdefault(key, []).append(name)
        return out

    def scores(self, problem: AttributionProblem) -> torch.Tensor:
        model, target = problem.model, loss_target(problem.task)
        layout = ParamLayout.of(model)
        groups = self.groups(layout)
        sizes = dict(zip(layout.names, layout.sizes))

        def grouped(per_tensor: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {b: sum(per_tensor[t] for t in ts) for b, ts in groups.items()}

        g_test = compute_grads(model, problem.x_test, problem.y_test, target, self.factored, self.chunk_size)
        g_lo = compute_grads(model, problem.x_left_out, problem.y_left_out, target, self.factored, self.chunk_size)
        direct = grouped(tensor_kernels(g_test, g_lo))
        n = problem.n_train
        # C_l, D_l and norms of the whole training set are kept when they fit half the budget
        # (one pass over the training set); otherwise a first pass collects the norms (λ_l)
        # and a second accumulates C_l diag(1/r_l) D_l chunk by chunk.
        n_t, n_j = next(iter(direct.values())).shape
        keep_bytes = 8 * len(groups) * n * (n_t + n_j + 1)
        one_pass = keep_bytes <= problem.memory_budget_mb * 2**20 / 2
        self.record.update({"one_pass": one_pass, "factored": type(g_test).__name__ == "FactoredGrads"})

        def chunks():
            return iter_grad_chunks(model, problem.x_train, problem.y_train, target,
                                    problem.memory_budget_mb / 2, self.factored, self.max_rows)

        dev = next(model.parameters()).device
        sq = {b: torch.zeros(n, dtype=torch.float64, device=dev) for b in groups}
        kept: list[tuple[slice, dict, dict]] = []
        for rows, g in chunks():
            for k, v in grouped(tensor_sq_norms(g)).items():
                sq[k][rows] = v.double()
            if one_pass:
                kept.append((rows, grouped(tensor_kernels(g_test, g)), grouped(tensor_kernels(g, g_lo))))
        lam = {b: (float(self.damping) if self.damping is not None else
                   float(sq[b].mean()) / (sum(sizes[t] for t in ts) * self.c))
               for b, ts in groups.items()}
        if any(v <= 0 for v in lam.values()):
            zero = [k for k, v in lam.items() if v <= 0]
            raise RefusedError(f"DataInf: the training gradients of {zero} are all zero, so λ_l = 0; "
                             f"set method.damping to a positive value")
        self.record["lambda"] = lam
        correction = {b: torch.zeros(n_t, n_j, dtype=torch.float64, device=dev) for b in groups}

        def accumulate(rows, C, D):
            for k in groups:
                r = lam[k] + sq[k][rows]
                correction[k] += (C[k].double() / r[None, :]) @ D[k].double()

        if one_pass:
            for rows, C, D in kept:
                accumulate(rows, C, D)
        else:
            for rows, g in chunks():
                accumulate(rows, grouped(tensor_kernels(g_test, g)), grouped(tensor_kernels(g, g_lo)))
        total = torch.zeros(n_t, n_j, dtype=torch.float64, device=dev)
        for k in groups:
            total += (direct[k].double() - correction[k] / n) / lam[k]
        return total
