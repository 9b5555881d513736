"""LiSSA and LiSSA-H (SPEC §3): the stochastic Neumann recursion

    h₀ = g,   h_t = g + h_{t−1} − (C_b + λI) h_{t−1} / s,   result h_depth / s

over `depth` mini-batches b drawn with replacement (`batch_size` ≥ n: the whole set), averaged over `repeat` runs; C_b is the
Gauss–Newton (`lissa`) or the true Hessian (`lissa_h`) of the mean loss over batch b. All
evaluated test instances run as one block of columns, so each step is one batched product.

Divergence. If every batch curvature C_b is positive semi-definite and its eigenvalues are
below 2s − λ, each step contracts by (1 − λ/s) and ‖h_t‖ ≤ s‖g‖/λ for all t. A column whose
norm exceeds `divergence_factor` × s‖g‖/λ (or turns non-finite) is therefore outside the
converging regime (for the indefinite true Hessian the factor leaves room for the extra
growth that negative batch curvature allows). `scale: auto` runs s over `scales` (SPEC's
list) from the smallest, stopping each attempt at the first sign of divergence, and keeps
the first s under which no column of any repeat diverged; if none qualifies the method
raises instead of returning a diverged result.
"""

from __future__ import annotations

import logging

import torch

from tda.methods.base import AttributionProblem, Method
from tda.methods.hessian import CurvatureOperator, InfluenceMethod, scores_from_solution

log = logging.getLogger(__name__)

SPEC_SCALES = (10, 20, 50, 100, 150, 200, 250, 300, 400, 500)


class Diverged(RuntimeError):
    pass


def lissa_solve(op: CurvatureOperator, G: torch.Tensor, damping: float, scale: float, depth: int, repeat: int,
                batch_size: int, generator: torch.Generator, divergence_factor: float = 10.0,
                check_every: int = 10) -> torch.Tensor:
    """≈ (C + λI)⁻¹ G for G [n_params, k]; raises :class:`Diverged` (naming the step)."""
    n = len(op.x)
    gnorm = G.norm(dim=0)
    bound = divergence_factor * scale * gnorm / damping if damping > 0 else torch.full_like(gnorm, float("inf"))
    total = torch.zeros_like(G)
    for r in range(repeat):
        h = G.clone()
        for t in range(1, depth + 1):
            if batch_size >= n:  # the whole set: the deterministic Neumann series of C
                Ch = op.matvec(h)
            else:
                Ch = op.batch_matvec(torch.randint(n, (batch_size,), generator=generator), h)
            h.mul_(1 - damping / scale).add_(G).add_(Ch, alpha=-1 / scale)  # G + h − (C_b + λI)h/s, in place
            if t % check_every == 0 or t == depth:
                norms = h.norm(dim=0)
                bad = ~torch.isfinite(norms) | (norms > bound)
                if bad.any():
                    raise Diverged(f"scale {scale}: {int(bad.sum())} of {len(bad)} columns diverged at step {t} "
                                   f"of repeat {r}")
        total += h / scale
    return total / repeat


class LiSSA(InfluenceMethod, Method):
    """IF score with (C + λI)⁻¹ g_test from the LiSSA recursion; λ = damping_multiple × λ₀.
    `scale` is a number or `auto` (see the module docstring)."""

    name = "lissa"
    default_curvature = "gn"

    def __init__(self, damping_multiple: float = 100.0, depth: int = 5000, repeat: int = 1,
                 scale: float | str = "auto", scales: list[float] | tuple[float, ...] = SPEC_SCALES,
                 batch_size: int = 128, curvature: str | None = None, divergence_factor: float = 10.0,
                 seed: int = 0, chunk_size: int = 256, dtype: str | None = None):
        Method.__init__(self)
        self.damping_multiple, self.depth, self.repeat = damping_multiple, int(depth), int(repeat)
        if scale != "auto" and not (isinstance(scale, (int, float)) and scale > 0):
            raise ValueError(f"method.scale={scale!r}: use a positive number or 'auto'")
        self.scale, self.scales = scale, sorted(float(s) for s in scales)
        self.batch_size, self.curvature = int(batch_size), curvature or self.default_curvature
        self.divergence_factor, self.seed, self.chunk_size, self.dtype = divergence_factor, seed, chunk_size, dtype

    def scores(self, problem: AttributionProblem) -> torch.Tensor:
        model, dtype, g_test, g_lo, lam = self._setup(problem, self.dtype, self.chunk_size, self.damping_multiple)
        op = self._operator(problem, model, dtype)
        solve, other, transposed = self.solve_side(g_test, g_lo)
        G = solve.T.contiguous()
        candidates = self.scales if self.scale == "auto" else [float(self.scale)]
        tried = []
        for s in candidates:
            gen = torch.Generator().manual_seed(int(self.seed))  # same batches for every scale tried
            try:
                X = lissa_solve(op, G, lam, s, self.depth, self.repeat, self.batch_size, gen, self.divergence_factor)
                break
            except Diverged as err:
                log.info("%s: %s", self.name, err)
                tried.append(str(err))
        else:
            raise ValueError(f"{self.name}: the recursion diverged for every scale in {candidates} "
                             f"(λ={lam:.3g}): {tried[-1]}. Use larger method.scales (or method.scale), "
                             f"or a larger method.damping_multiple")
        self.record.update({"scale": s, "scales_diverged": tried, "curvature": self.curvature,
                            "depth": self.depth, "repeat": self.repeat, "batch_size": self.batch_size,
                            "solved_side": "left_out" if transposed else "test"})
        return scores_from_solution(X, other.to(X.dtype), problem.n_train, transposed).to(torch.float64)


class LiSSAH(LiSSA):
    """LiSSA with the true Hessian (SPEC §3, LiSSA-H)."""

    name = "lissa_h"
    default_curvature = "hessian"
