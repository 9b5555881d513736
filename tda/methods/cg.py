"""Influence functions by conjugate gradients (docs/method.md §3.4, "CG"): (C + λI) X = B for a block of
right-hand sides at once, C the Gauss–Newton (the authors' runs) or the true Hessian.

Block CG (O'Leary 1980) in its breakdown-free form (Ji & Li 2017): the columns share one
Krylov space, so every iteration's step minimises each column's error over the search
directions of all of them. A block of k columns then needs fewer iterations than any one
column alone — in effect the block takes the k largest eigenvalues of C out together, and a
trained network's Gauss–Newton has a few large outliers over a flat bulk (100 columns need
2.4–4× fewer curvature products than solving them one by one on the Folktables-sized MLP,
~10× on a slice of CIFAR-10 for a ResNet-9; benchmarks/methods_influence.py). One iteration
= one batched curvature product of the active search directions.

The search directions are re-orthonormalised every iteration and directions that have become
linearly dependent (duplicated right-hand sides, columns converging alike) are dropped, which
is what keeps the block recurrence from breaking down. A column stops (its solution and
residual are frozen and it leaves later products) once its relative residual
‖b − (C+λI)x‖/‖b‖ is below `tol`. With C + λI positive definite CG converges; with an
indefinite true Hessian (λ too small) the projected matrix Pᵀ(C+λI)P stops being positive
definite, the active columns are stopped there and flagged.
k = 1 is textbook CG.
"""

from __future__ import annotations

import logging

import torch

from tda.exits import RefusedError
from tda.methods.checks import non_negative, positive_int
from tda.methods.curvature import CurvatureOperator, Matvec
from tda.methods.influence import InfluenceMethod, column_norms, scores_from_solution, solve_side
from tda.methods.progress import Progress
from tda.problem import AttributionProblem

log = logging.getLogger(__name__)


class Scratch:
    """Flat buffers reused as [n, r] matrices for any r up to their capacity: the block's
    float64 [n_params, k] arrays are hundreds of MB each, and allocating them afresh every
    iteration costs page faults comparable to the GEMMs that fill them."""

    def __init__(self, n: int, device: torch.device):
        self.n, self.device, self._bufs = n, device, {}

    def __call__(self, name: str, r: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < self.n * r or buf.dtype != dtype:
            buf = self._bufs[name] = torch.empty(self.n * max(r, 1), dtype=dtype, device=self.device)
        return buf[:self.n * r].view(self.n, r)


def orthonormal_basis(Z: torch.Tensor, rtol: float = 1e-6, out: torch.Tensor | None = None) -> torch.Tensor:
    """A basis [n, r] of the span of Z [n, k], r ≤ k, orthonormal to ~eps/rtol² (float64:
    1e-4, ample for CG, which only needs Pᵀ(C+λI)P well conditioned): from the
    eigendecomposition of the Gram matrix of Z's columns scaled to unit norm (two GEMMs
    rather than a Householder QR), dropping directions whose singular value is below rtol ×
    the largest. The unit scaling keeps a small (nearly converged) residual from being
    mistaken for a dependent one; a dropped direction is only postponed to a later iteration.
    The scaling is applied to the Gram matrix and folded into the coefficients, so Z is read
    twice and the basis written once (into `out`'s storage, [n, ≥ r], if given)."""
    gram = Z.T @ Z
    norms = gram.diagonal().sqrt()
    live = (norms > 0).nonzero().squeeze(1)
    if len(live) == 0:
        return Z[:, :0]
    inv = 1 / norms[live]
    e, U = torch.linalg.eigh(gram[live][:, live] * inv[:, None] * inv[None, :])
    keep = e > rtol ** 2 * e[-1]
    coef = torch.zeros(Z.shape[1], int(keep.sum()), dtype=Z.dtype, device=Z.device)
    coef[live] = inv[:, None] * (U[:, keep] / e[keep].sqrt())
    if out is None:
        return Z @ coef
    return torch.mm(Z, coef, out=out.view(-1)[:len(Z) * coef.shape[1]].view(len(Z), -1))


def block_cg(matvec: Matvec, B: torch.Tensor, damping: float, tol: float = 1e-6,
             maxiter: int = 200) -> tuple[torch.Tensor, dict]:
    """Solve (C + damping·I) X = B by block CG, from X = 0. B [n, k] -> X [n, k] and info
    (per-column iterations and relative residuals, convergence and breakdown counts, search
    directions per iteration, and `no_progress`: the columns left unconverged that no iteration
    improved — none ran, b or the iterates are not finite, or ‖r‖ in the (C+λI)⁻¹-norm, which
    CG lowers at every step, is not below ‖b‖; their X is zero or meaningless). `matvec` takes
    [n, r] for any number r of directions, in B's dtype. The 2-norm of the residual is no
    test of progress: it can rise in the first iterations while the error falls (the tiny
    config's MLP at 1·λ₀: 1.3–1.7 × ‖b‖ for 6 iterations, then 0.56 at 10).

    The recurrence runs in float64 whatever B's dtype: in float32 the block's directions lose
    their conjugacy and columns can stall short of the tolerance (seen once, in a run not kept
    in the repository, on 3,000 rows of the Folktables-sized MLP at 1·λ₀, tol 1e-5: 3 of 100
    columns stuck at 4e-5 after 60 iterations; in float64 all 100 converged within 21).
    Memory: the active columns' residual, the directions P and (C+λI)P and the next
    directions' scratch, in float64 (reused from iteration to iteration), and the solution and
    result in B's dtype: the solution is no part of the recurrence (the residual is updated,
    not recomputed), so B's precision is all it needs, and its update takes the directions in
    that dtype, which the product needs anyway."""
    n, k = B.shape
    dtype, f64 = B.dtype, torch.float64
    scratch = Scratch(n, B.device)
    bnorm = column_norms(B)
    finite = torch.isfinite(bnorm)
    rel = (bnorm > 0).double()  # ‖b − (C+λI)·0‖ / ‖b‖; a zero column is solved by 0
    rel[~finite] = float("nan")  # never active, never converged: reported as no progress
    bnorm = bnorm.clamp_min(torch.finfo(f64).tiny)
    iters = torch.zeros(k, dtype=torch.long, device=B.device)
    breakdown = torch.zeros(k, dtype=torch.bool, device=B.device)
    X = torch.zeros_like(B)
    # the active columns' solutions and residuals, compacted (copied out when columns converge)
    cols = (rel > tol).nonzero().squeeze(1)
    Xa, Ra = torch.zeros(n, len(cols), dtype=dtype, device=B.device), B[:, cols].double()
    P = orthonormal_basis(Ra, out=scratch("P0", len(cols)))
    widths = []
    progress = Progress()
    for it in range(maxiter):
        if len(cols) == 0 or P.shape[1] == 0:
            break
        if progress.due():
            log.info("cg: iteration %d of at most %d: %d of %d columns converged, max relative residual %.2e",
                     it, maxiter, int((rel <= tol).sum()), k, float(rel[cols].max()))
        P_in = P if dtype == f64 else scratch("P_in", P.shape[1], dtype).copy_(P)
        Q = matvec(P_in) if dtype == f64 else scratch("Q", P.shape[1]).copy_(matvec(P_in))
        Q.add_(P, alpha=damping)  # (C + λI) P [n, r], float64
        widths.append(P.shape[1])
        PtQ = P.T @ Q
        L, not_pd = torch.linalg.cholesky_ex((PtQ + PtQ.T) / 2)
        if not_pd:  # Pᵀ(C+λI)P is not positive definite: (C+λI) is not, along these directions
            breakdown[cols] = True
            break
        alpha = torch.cholesky_solve(P.T @ Ra, L)  # [r, k_active]
        Xa.addmm_(P_in, alpha.to(dtype))
        Ra.addmm_(Q, alpha, alpha=-1)
        iters[cols] += 1
        rel[cols] = column_norms(Ra) / bnorm[cols]
        done = rel[cols] <= tol
        if done.any():
            X[:, cols[done]] = Xa[:, done]
            cols, Xa, Ra = cols[~done], Xa[:, ~done], Ra[:, ~done]
            if len(cols) == 0:
                break
        # next directions: the active residuals made (C+λI)-orthogonal to the current ones,
        # then orthonormalised into the other direction buffer (P is read until then)
        beta = torch.cholesky_solve(Q.T @ Ra, L)
        Z = torch.addmm(Ra, P, beta, alpha=-1, out=scratch("Z", Ra.shape[1]))
        P = orthonormal_basis(Z, out=scratch(f"P{(it + 1) % 2}", Z.shape[1]))
    X[:, cols] = Xa
    # progress of the columns still active: with e = x − x*, ‖e‖²_(C+λI) − ‖x*‖²_(C+λI) =
    # ‖r‖²_(C+λI)⁻¹ − ‖b‖²_(C+λI)⁻¹ = −xᵀ(b + r), negative once any iteration helped
    no_progress = ~finite
    gain = (Xa.double() * (B[:, cols].double() + Ra)).sum(0)
    no_progress[cols] |= ~(gain > 0) | ~torch.isfinite(Xa).all(0)
    info = {"iterations": iters.tolist(), "relative_residual": rel.tolist(),
            "converged": int(((rel <= tol) & ~breakdown).sum()), "n_columns": k,
            "breakdown": int(breakdown.sum()), "max_iterations": int(iters.max()) if k else 0,
            "directions_per_iteration": widths, "no_progress": int(no_progress.sum())}
    return X, info


class CG(InfluenceMethod):
    """IF score g_testᵀ (C + λI)⁻¹ g_j / n by block CG; λ = damping_multiple × λ₀.
    `tol`: relative residual at which a column stops; `maxiter`: iterations at most;
    `block: false` solves one column at a time (the slow reference of the benchmark)."""

    def __init__(self, curvature: str = "gn", damping_multiple: float = 100.0, tol: float = 1e-6,
                 maxiter: int = 200, batch_size: int = 1024, chunk_size: int = 256, dtype: str | None = None,
                 block: bool = True):
        super().__init__(damping_multiple, dtype, batch_size, chunk_size, curvature)
        self.tol = non_negative("tol", tol, "relative residual at which a column stops", 1e-6)
        self.maxiter = positive_int("maxiter", maxiter, "iterations", 100)
        self.block = block

    def scores(self, problem: AttributionProblem) -> torch.Tensor:
        model, dtype, g_test, g_lo, lam = self._prepare(problem)
        op = self._curvature_operator(problem, model, dtype)
        solve, other, transposed = solve_side(g_test, g_lo)
        B = solve.T.contiguous()
        with self.phase("solve"):
            X, info = self._solve(op, B, lam)
        if info["breakdown"]:
            raise RefusedError(f"cg: C + λI is not positive definite along {info['breakdown']} of {info['n_columns']} "
                             f"solves (curvature={self.curvature}, λ={lam:.3g}); the damped quadratic model has no "
                             f"minimum. Use method.curvature=gn or a larger method.damping_multiple")
        if info["no_progress"]:
            raise RefusedError(f"cg: {info['no_progress']} of {info['n_columns']} solves made no progress in "
                             f"method.maxiter={self.maxiter} iterations (none ran, the gradients or iterates are not "
                             f"finite, or the error did not decrease), so their scores would be zero or meaningless "
                             f"(curvature={self.curvature}, λ={lam:.3g}). Raise method.maxiter (e.g. "
                             f"method.maxiter=200) and check the final model's gradients for NaN/inf")
        if info["converged"] < info["n_columns"]:
            log.warning("cg: %d of %d columns did not reach tol=%g in maxiter=%d (max relative residual %.2e); "
                        "raise method.maxiter or method.damping_multiple",
                        info["n_columns"] - info["converged"], info["n_columns"], self.tol, self.maxiter,
                        max(info["relative_residual"]))
        self.record.update({"cg": info, "curvature": self.curvature,
                            "solved_side": "left_out" if transposed else "test",
                            "curvature_products": op.n_matvecs, "columns_per_product": op.max_columns})
        with self.phase("scores"):
            return scores_from_solution(X, other.to(X.dtype), problem.n_train, transposed).to(torch.float64)

    def _solve(self, op: CurvatureOperator, B: torch.Tensor, lam: float) -> tuple[torch.Tensor, dict]:
        """(C + λI)⁻¹ B [n_params, k] and the solve's info: as one block, or one column at a time."""
        if self.block:
            return block_cg(op.matvec, B, lam, self.tol, self.maxiter)
        cols, infos = [], []
        progress = Progress()
        for c in range(B.shape[1]):
            if progress.due():
                log.info("cg: column %d of %d, one at a time", c, B.shape[1])
            x, inf = block_cg(op.matvec, B[:, c:c + 1], lam, self.tol, self.maxiter)
            cols.append(x)
            infos.append(inf)
        X = torch.cat(cols, dim=1)
        iterations = [i["iterations"][0] for i in infos]
        info = {"iterations": iterations, "relative_residual": [i["relative_residual"][0] for i in infos],
                "converged": sum(i["converged"] for i in infos), "n_columns": B.shape[1],
                "breakdown": sum(i["breakdown"] for i in infos), "max_iterations": max(iterations, default=0),
                "no_progress": sum(i["no_progress"] for i in infos)}
        return X, info

