"""Influence functions by conjugate gradients (SPEC §3, "CG"): (C + λI) X = B for a block of
right-hand sides at once, C the Gauss–Newton (the authors' runs) or the true Hessian.

Each column runs its own CG recurrence (own step sizes), but the expensive curvature
product is one batched pass over the training set for all active columns; a column stops
(is masked out of later products) once its relative residual ‖b − (C+λI)x‖/‖b‖ is below
`tol`. With C + λI positive definite, CG converges; with an indefinite true Hessian
(λ too small) a column meets pᵀ(C+λI)p ≤ 0, is stopped there and flagged in the record.
"""

from __future__ import annotations

import logging

import torch

from tda.methods.base import AttributionProblem, Method
from tda.methods.hessian import InfluenceMethod, Matvec, scores_from_solution

log = logging.getLogger(__name__)


def block_cg(matvec: Matvec, B: torch.Tensor, damping: float, tol: float = 1e-6, maxiter: int = 200,
             X0: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Solve (C + damping·I) X = B column by column, batched. B [n, k] -> X [n, k] and info
    (per-column iterations, relative residuals, convergence and breakdown flags).
    `matvec` takes [n, k'] for any subset of k' columns."""
    n, k = B.shape
    X = torch.zeros_like(B) if X0 is None else X0.clone()
    R = B - (matvec(X) + damping * X) if X0 is not None else B.clone()
    P = R.clone()
    rs = (R * R).sum(0)
    bnorm = B.norm(dim=0).clamp_min(torch.finfo(B.dtype).tiny)
    active = (rs.sqrt() / bnorm) > tol
    iters = torch.zeros(k, dtype=torch.long)
    breakdown = torch.zeros(k, dtype=torch.bool)
    for _ in range(maxiter):
        idx = active.nonzero().squeeze(1)
        if len(idx) == 0:
            break
        Pa = P[:, idx]
        AP = matvec(Pa) + damping * Pa
        pAp = (Pa * AP).sum(0)
        bad = pAp <= 0  # non-positive curvature: (C+λI) is not positive definite along p
        if bad.any():
            breakdown[idx[bad]] = True
            active[idx[bad]] = False
        good = ~bad
        idx, Pa, AP, pAp = idx[good], Pa[:, good], AP[:, good], pAp[good]
        if len(idx) == 0:
            break
        alpha = rs[idx] / pAp
        X[:, idx] += alpha * Pa
        R[:, idx] -= alpha * AP
        rs_new = (R[:, idx] ** 2).sum(0)
        P[:, idx] = R[:, idx] + (rs_new / rs[idx]) * Pa
        rs[idx] = rs_new
        iters[idx] += 1
        active[idx] = (rs_new.sqrt() / bnorm[idx]) > tol
    rel = rs.sqrt() / bnorm
    info = {"iterations": iters.tolist(), "relative_residual": rel.tolist(),
            "converged": int(((rel <= tol) & ~breakdown).sum()), "n_columns": k,
            "breakdown": int(breakdown.sum()), "max_iterations": int(iters.max()) if k else 0}
    return X, info


class CG(InfluenceMethod, Method):
    """IF score g_testᵀ (C + λI)⁻¹ g_j / n by block CG; λ = damping_multiple × λ₀.
    `block: false` solves one column at a time (the slow reference of the benchmark)."""

    name = "cg"

    def __init__(self, curvature: str = "gn", damping_multiple: float = 100.0, tol: float = 1e-6,
                 maxiter: int = 200, batch_size: int = 1024, chunk_size: int = 256, dtype: str | None = None,
                 block: bool = True):
        Method.__init__(self)
        self.curvature, self.damping_multiple, self.tol, self.maxiter = curvature, damping_multiple, tol, maxiter
        self.batch_size, self.chunk_size, self.dtype, self.block = batch_size, chunk_size, dtype, block

    def scores(self, problem: AttributionProblem) -> torch.Tensor:
        model, dtype, g_test, g_lo, lam = self._setup(problem, self.dtype, self.chunk_size, self.damping_multiple)
        op = self._operator(problem, model, dtype)
        solve, other, transposed = self.solve_side(g_test, g_lo)
        B = solve.T.contiguous()
        if self.block:
            X, info = block_cg(op.matvec, B, lam, self.tol, self.maxiter)
        else:
            cols, infos = [], []
            for c in range(B.shape[1]):
                x, inf = block_cg(op.matvec, B[:, c:c + 1], lam, self.tol, self.maxiter)
                cols.append(x)
                infos.append(inf)
            X = torch.cat(cols, dim=1)
            info = {"iterations": [i["iterations"][0] for i in infos],
                    "relative_residual": [i["relative_residual"][0] for i in infos],
                    "converged": sum(i["converged"] for i in infos), "n_columns": B.shape[1],
                    "breakdown": sum(i["breakdown"] for i in infos)}
        if info["breakdown"]:
            raise ValueError(f"cg: C + λI is not positive definite along {info['breakdown']} of {info['n_columns']} "
                             f"solves (curvature={self.curvature}, λ={lam:.3g}); the damped quadratic model has no "
                             f"minimum. Use method.curvature=gn or a larger method.damping_multiple")
        if info["converged"] < info["n_columns"]:
            log.warning("cg: %d of %d columns did not reach tol=%g in maxiter=%d (max relative residual %.2e); "
                        "raise method.maxiter or method.damping_multiple",
                        info["n_columns"] - info["converged"], info["n_columns"], self.tol, self.maxiter,
                        max(info["relative_residual"]))
        self.record.update({"cg": info, "curvature": self.curvature, "solved_side": "left_out" if transposed else "test",
                            "curvature_products": op.n_matvecs, "columns_per_product": op.max_columns})
        return scores_from_solution(X, other.to(X.dtype), problem.n_train, transposed).to(torch.float64)
