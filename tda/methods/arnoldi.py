"""Arnoldi influence functions (Schioppa, Zablotskaia, Vilar, Sokolov, "Scaling Up Influence
Functions", AAAI 2022).

`n_iters` Arnoldi steps on the curvature C (Hessian or Gauss–Newton of the mean training
loss) from a seeded random start build an orthonormal Krylov basis Q [n_params, m] and the
Hessenberg matrix Qᵀ C Q; its `top_k` eigenvalues of largest magnitude μ and Ritz vectors
U = Q·V approximate C's dominant eigenpairs. The inverse is then approximated on that
subspace:

    (C + λI)⁻¹ ≈ U diag(1/(μ + λ)) Uᵀ          (+ (I − UUᵀ)/λ with `complement: true`)

so scores are (g_test U) diag(1/(μ+λ)) (g_j U)ᵀ / n — one projection of each gradient.
Schioppa et al. drop the complement (the paper's choice, default here). Approximation
error: directions of g outside span(U) are ignored (or treated as zero curvature with the
complement), so the error is at most ‖P⊥ g_test‖‖P⊥ g_j‖/λ / n per score, P⊥ = I − UUᵀ; it
vanishes when top_k = n_iters = n_params.
"""

from __future__ import annotations

import logging

import torch

from tda.config import ConfigError
from tda.exits import RefusedError
from tda.methods.checks import positive_int
from tda.methods.curvature import Matvec
from tda.methods.influence import InfluenceMethod
from tda.methods.layout import ParamLayout
from tda.methods.progress import Progress
from tda.problem import AttributionProblem

log = logging.getLogger(__name__)


def arnoldi_eigs(matvec: Matvec, n: int, n_iters: int, top_k: int, generator: torch.Generator,
                 dtype: torch.dtype, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (by |μ|) Ritz pairs of the symmetric operator: (μ [k] float64, U [n, k])."""
    n_iters = min(int(n_iters), n)
    # the basis as rows [m, n]: each step reads only the vectors so far, each a contiguous row
    Q = torch.zeros(n_iters + 1, n, dtype=dtype, device=device)
    Hs = torch.zeros(n_iters + 1, n_iters, dtype=torch.float64)
    v = torch.randn(n, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    Q[0] = v / v.norm()
    m = n_iters
    progress = Progress()
    for j in range(n_iters):
        if progress.due():
            log.info("arnoldi: step %d of %d", j, n_iters)
        w = matvec(Q[j].unsqueeze(1)).squeeze(1)
        # two passes of Gram–Schmidt: one loses orthogonality in float32
        for _ in range(2):
            c = Q[:j + 1] @ w
            w = w - c @ Q[:j + 1]
            Hs[:j + 1, j] += c.double().cpu()
        beta = w.norm()
        Hs[j + 1, j] = float(beta)
        if float(beta) < 1e-10 * float(Hs[:j + 1, :j + 1].abs().max().clamp_min(1e-300)):
            m = j + 1  # invariant subspace found: the Ritz pairs are exact
            break
        Q[j + 1] = w / beta
    T = Hs[:m, :m]
    mu, V = torch.linalg.eigh((T + T.T) / 2)  # C symmetric: Qᵀ C Q is symmetric tridiagonal up to rounding
    k = min(int(top_k), m)
    order = mu.abs().argsort(descending=True)[:k]
    U = Q[:m].T @ V[:, order].to(dtype=dtype, device=Q.device)
    return mu[order], U


class Arnoldi(InfluenceMethod):
    """IF score from the `top_k` Ritz pairs of `n_iters` Arnoldi steps (seeded by `seed`);
    `complement`: add (I − UUᵀ)/λ for the directions outside them. [n_test, n_left_out]."""

    def __init__(self, curvature: str = "gn", damping_multiple: float = 100.0, n_iters: int = 200,
                 top_k: int = 100, complement: bool = False, seed: int = 0, batch_size: int = 1024,
                 chunk_size: int = 256, dtype: str | None = None):
        super().__init__(damping_multiple, dtype, batch_size, chunk_size, curvature)
        self.n_iters = positive_int("n_iters", n_iters, "Arnoldi steps", 200)
        self.top_k = positive_int("top_k", top_k, "eigenpairs to keep", min(100, self.n_iters))
        if self.top_k > self.n_iters:
            raise ConfigError(f"method.top_k={top_k} exceeds method.n_iters={n_iters}; Arnoldi yields at most "
                             f"n_iters eigenpairs; e.g. method.top_k={self.n_iters}")
        if complement and self.damping_multiple == 0:
            raise ConfigError("method.complement=true divides the directions outside the top-k by λ, so "
                             f"method.damping_multiple={damping_multiple} (λ = 0) is not allowed with it; e.g. "
                             "method.damping_multiple=100 or method.complement=false")
        self.complement, self.seed = complement, seed

    def scores(self, problem: AttributionProblem) -> torch.Tensor:
        n_params = ParamLayout.of(problem.model).n_params
        if self.top_k > n_params:  # before any gradient: C has only n_params eigenpairs
            raise ConfigError(f"method.top_k={self.top_k} exceeds the {n_params} trainable parameters of the model, "
                             f"the most eigenpairs its curvature has; e.g. method.top_k={min(n_params, 100)} "
                             f"(and method.n_iters ≥ top_k)")
        model, dtype, g_test, g_lo, lam = self._prepare(problem)
        op = self._curvature_operator(problem, model, dtype)
        gen = torch.Generator().manual_seed(int(self.seed))
        with self.phase("solve"):
            mu, U = arnoldi_eigs(op.matvec, op.n_params, self.n_iters, self.top_k, gen, dtype, op.device)
        if (mu + lam <= 0).any():  # the check is the Ritz values the solve returns: free
            raise RefusedError(f"arnoldi: {int((mu + lam <= 0).sum())} Ritz values μ have μ + λ ≤ 0 "
                             f"(curvature={self.curvature}, λ={lam:.3g}, min μ={float(mu.min()):.3g}); "
                             f"use method.curvature=gn or a larger method.damping_multiple")
        with self.phase("scores"):
            inv = (1.0 / (mu + lam)).to(U.device, dtype)
            pt, pl = g_test.to(dtype) @ U, g_lo.to(dtype) @ U  # [n_test, k], [n_left_out, k]
            s = (pt * inv) @ pl.T
            if self.complement:
                s = s + (g_test.to(dtype) @ g_lo.to(dtype).T - pt @ pl.T) / lam
        self.record.update({"curvature": self.curvature, "n_eigs": len(mu), "eig_max": float(mu.abs().max()),
                            "eig_min_kept": float(mu.abs().min()), "n_iters": self.n_iters,
                            "curvature_products": op.n_matvecs})
        return (s / problem.n_train).to(torch.float64)
