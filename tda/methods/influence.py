"""The base of the influence-function methods (docs/method.md §3.2):

    score(z, j) = g_testᵀ (C + λI)⁻¹ g_j / n,     λ = damping_multiple × λ₀,

C the curvature of the mean training loss (Gauss–Newton or Hessian, :mod:`tda.methods.curvature`)
and λ₀ its scale (:mod:`tda.methods.damping`). Subclasses differ only in how they apply
(C + λI)⁻¹: block CG, the LiSSA recursion, Arnoldi's top eigenpairs, (E)K-FAC's Kronecker
factors. :class:`InfluenceMethod` owns the settings they share — curvature, damping multiple,
solver dtype, batch and chunk sizes, each checked when the method is built — and the steps they
share: gradients in the solver dtype, λ₀ and λ, the curvature operator, and (with
:func:`solve_side` / :func:`scores_from_solution`) which side of the score to solve for.

Where the time goes: every method times its steps with :meth:`InfluenceMethod.phase` into
`record["seconds"]` (gradients, lambda0, factors, solve, scores, and the safety checks as
`check_*`), which `benchmarks/methods_influence.py` reports as the checks' share.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from tda.config import ConfigError
from tda.methods.base import Method
from tda.methods.cache import CurvatureCache
from tda.methods.checks import non_negative, positive_int
from tda.methods.curvature import CURVATURES, CurvatureOperator
from tda.methods.damping import base_damping, resolve_damping
from tda.methods.gradients import per_example_grads
from tda.problem import AttributionProblem

# `method.dtype` -> the dtype the solver works in (None: the model's own)
DTYPES = {"float32": torch.float32, "float64": torch.float64, None: None}


def check_curvature(curvature: Any, example: str = "gn") -> str:
    """`curvature` if it is one of tda.methods.curvature.CURVATURES, else ValueError."""
    if curvature not in CURVATURES:
        raise ConfigError(f"method.curvature={curvature!r} is not one of {', '.join(CURVATURES)}; "
                         f"e.g. method.curvature={example}")
    return curvature


def check_dtype(dtype: Any) -> str | None:
    """`dtype` if it names a solver dtype (float32, float64, null: the model's own), else ValueError."""
    if dtype not in DTYPES:
        raise ConfigError(f"method.dtype={dtype!r} is not one of float32, float64, null (the model's own); "
                         f"e.g. method.dtype=float64")
    return dtype


class InfluenceMethod(Method):
    """Shared settings and steps of the influence-function methods.

    `curvature`: gn | hessian (K-FAC and EK-FAC approximate the Gauss–Newton); `damping_multiple`:
    λ = damping_multiple × λ₀; `dtype`: float32 | float64 | None (the model's) for the solver;
    `batch_size`: training rows per curvature product (what it means for a subclass:
    `batch_size_means`, shown in its error message); `chunk_size`: rows per per-example-gradient
    chunk."""

    default_curvature = "gn"  # the example a refused `method.curvature` is pointed to

    def __init__(self, damping_multiple: float, dtype: str | None, batch_size: int, chunk_size: int,
                 curvature: str = "gn", batch_size_means: str = "training rows per curvature-product batch",
                 batch_size_example: int = 1024):
        super().__init__()
        self.curvature = check_curvature(curvature, self.default_curvature)
        self.damping_multiple = non_negative("damping_multiple", damping_multiple, "λ = damping_multiple × λ₀", 100.0)
        self.batch_size = positive_int("batch_size", batch_size, batch_size_means, batch_size_example)
        self.chunk_size = positive_int("chunk_size", chunk_size, "rows per per-example-gradient chunk", 256)
        self.dtype = check_dtype(dtype)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Add the seconds the block takes, less those of the phases nested in it, to
        `record["seconds"][name]`; safety checks are named `check_*`."""
        nested = self.__dict__.setdefault("_nested_seconds", [])
        nested.append(0.0)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - t0
            inner = nested.pop()
            if nested:
                nested[-1] += elapsed
            seconds = self.record.setdefault("seconds", {})
            seconds[name] = seconds.get(name, 0.0) + elapsed - inner

    def _prepare(self, problem: AttributionProblem) -> tuple[nn.Module, torch.dtype, torch.Tensor, torch.Tensor,
                                                               float]:
        """The first steps of every `scores`: (the model on the problem's device in eval mode, the
        solver dtype, loss gradients of the test [n_test, n_params] and left-out [n_left_out,
        n_params] instances in that dtype, λ)."""
        model = problem.model.to(problem.device)
        model.eval()
        dtype = DTYPES[self.dtype] or next(model.parameters()).dtype
        with self.phase("gradients"):
            g_test = per_example_grads(model, problem.x_test, problem.y_test, problem.task, self.chunk_size,
                                       factored=True).to(dtype)
            g_lo = per_example_grads(model, problem.x_left_out, problem.y_left_out, problem.task, self.chunk_size,
                                     factored=True).to(dtype)
        return model, dtype, g_test, g_lo, self._damping(problem, model)

    def _damping(self, problem: AttributionProblem, model: nn.Module) -> float:
        """λ = damping_multiple × λ₀ (both recorded). Every `scores` calls this first: it opens
        the problem's cache of per-model quantities (`self._cache`: λ₀ here, the factors and
        spectra of the subclasses; :mod:`tda.methods.cache`)."""
        self._cache = CurvatureCache(problem.cache_dir, model, problem.x_train, problem.y_train)
        with self.phase("lambda0"):
            lam0 = base_damping(model, problem.x_train, problem.y_train, problem.task, self.chunk_size,
                                cache=self._cache)
        return resolve_damping(self.damping_multiple, lam0, self.record)

    def _curvature_operator(self, problem: AttributionProblem, model: nn.Module, dtype: torch.dtype,
                            batch_size: int | None = None) -> CurvatureOperator:
        """The method's curvature of the mean training loss, in batches of `batch_size` training
        rows (default: the method's), its column blocks bounded by the memory budget."""
        return CurvatureOperator(model, problem.x_train, problem.y_train, problem.task, self.curvature,
                                 batch_size or self.batch_size, dtype, problem.device, problem.memory_budget_mb)


def column_norms(X: torch.Tensor, rows: int = 8192) -> torch.Tensor:
    """‖X[:, j]‖ [k] in float64 for X [n, k]: squares summed over blocks of rows (norm(dim=0)
    reduces across the rows of a row-major matrix, which is slower; docs/methods.md)."""
    total = torch.zeros(X.shape[1], dtype=torch.float64, device=X.device)
    for r in range(0, len(X), rows):
        block = X[r:r + rows].double()
        total += (block * block).sum(0)
    return total.sqrt()


def solve_side(g_test: torch.Tensor, g_lo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(rows to solve for, rows to dot with, transposed?): (C+λI)⁻¹ is symmetric, so the
    smaller side is solved and the other one dotted. g_test [n_test, n_params], g_lo [n_left_out, n_params]."""
    if len(g_lo) < len(g_test):
        return g_lo, g_test, True
    return g_test, g_lo, False


def scores_from_solution(X: torch.Tensor, other: torch.Tensor, n: int, transposed: bool) -> torch.Tensor:
    """X [n_params, k] = (C+λI)⁻¹ of the solved rows; other [m, n_params] -> [n_test, n_left_out]."""
    s = (other @ X).T / n  # [k, m]
    return (s.T if transposed else s).contiguous()
