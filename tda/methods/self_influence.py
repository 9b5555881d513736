"""Self-influence τ(z_i, z_i) of every training instance (docs/methods.md, "Self-influence"): a
method's score of a training instance against itself, the score it gives when the instance is both
the test instance and the left-out one.

Any method has it: :func:`diagonal_of_scores` runs the method's own `scores` on blocks of training
rows, each block the test and the left-out instances of one call, and keeps the diagonal of each
[block, block] result — the pairwise code is what runs (each solver applied to a block of training
gradients instead of test gradients), no n_train × n_train matrix is formed, and the blocks are
sized to `attribution.memory_budget_mb`. This is the default of
:meth:`tda.methods.base.Method.self_influence`; a method with a cheaper closed form (Grad-Dot's
‖g_i‖², TRAK's features computed once) overrides it and is tested against it.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from tda.methods.layout import ParamLayout
from tda.methods.progress import Progress
from tda.problem import AttributionProblem

log = logging.getLogger(__name__)

MAX_BLOCK_ROWS = 1024


def block_rows(problem: AttributionProblem, copies: int = 16, bytes_per_value: int = 8) -> int:
    """Training rows per block: `copies` float64 vectors of the parameter space per row (the
    block's test and left-out gradients, and a solver's iterates, residuals and directions) within
    half the memory budget; at most MAX_BLOCK_ROWS, at least 1."""
    per_row = ParamLayout.of(problem.model).n_params * bytes_per_value * copies
    rows = int(problem.memory_budget_mb * 2**20 / 2 // max(per_row, 1))
    return max(1, min(rows, MAX_BLOCK_ROWS, problem.n_train))


def block_problem(problem: AttributionProblem, rows: torch.Tensor) -> AttributionProblem:
    """`problem` with the training rows `rows` [k] as its test instances and its left-out instances:
    the scores of this problem hold τ(z_i, z_j) for i, j in `rows`, its diagonal τ(z_i, z_i)."""
    return dataclasses.replace(problem, x_test=problem.x_train[rows], y_test=problem.y_train[rows],
                               left_out_indices=rows, test_indices=rows)


def diagonal_of_scores(method: Any, problem: AttributionProblem, rows: int | None = None) -> torch.Tensor:
    """τ(z_i, z_i) [n_train] float64 from `method.scores` on blocks of `rows` training rows (default:
    :func:`block_rows`). The method's record holds each block's record (`blocks`)."""
    n = problem.n_train
    rows = rows or block_rows(problem)
    out = torch.empty(n, dtype=torch.float64)
    records = []
    progress = Progress()
    for start in range(0, n, rows):
        if progress.due():
            log.info("self-influence: training rows %d..%d of %d", start, min(start + rows, n), n)
        block = torch.arange(start, min(start + rows, n))
        method.record = {}
        scores = method.scores(block_problem(problem, block))  # [k, k]
        out[block] = torch.diagonal(scores).detach().double().cpu()
        records.append(method.record)
    method.record = {"self_influence": "diagonal of the method's scores, block by block", "block_rows": rows,
                     "blocks": records}
    return out
