"""LiSSA and LiSSA-H (docs/method.md §3.4): the stochastic Neumann recursion

    h₀ = g,   h_t = g + h_{t−1} − (C_b + λI) h_{t−1} / s,   result h_depth / s

over `depth` mini-batches b drawn with replacement (`batch_size` ≥ n: the whole set), averaged
over `repeat` runs; C_b is the Gauss–Newton (`lissa`) or the true Hessian (`lissa_h`) of the
mean loss over batch b. All evaluated test instances run as one block of columns, so each
step is one batched product.

Definiteness. The recursion is a Neumann series for (C + λI)⁻¹, which exists as its limit
only if K = C + λI (the full-data curvature) is positive definite: along an eigenvector with
eigenvalue μ ≤ 0 each step multiplies h by 1 + |μ|/s, a growth slow enough (1 + 0.09/500 per
step for the default MLP's Hessian at 100·λ₀) to stay under any norm bound for thousands of
steps while the result is already wrong. So before the recursion, `lanczos_steps` Lanczos
steps (full data, float64, :func:`tda.methods.spectrum.lanczos_extremes`) estimate the
smallest eigenvalue of K — run on C and shifted by λ (the same Krylov space), cached per final
model and curvature (:mod:`tda.methods.cache`) so that a damping sweep runs them once — and
after each run the smallest Ritz value of K on the span of the final iterates and increments
(the increments are power iterations of I − K/s, so they line up with any growing direction:
:func:`tda.methods.spectrum.span_ritz`) is computed; either one ≤ 0 (up to the operator's
rounding) proves K is not positive definite and the method refuses, as CG and Arnoldi do.
Both are recorded (`spectrum`), with the full-data relative residual ‖g − K x‖/‖g‖ of the
returned solution, whose products K h come from those of the span's check.
Cost: `lanczos_steps` one-column products once per final model, and ≤ 2·k·`repeat` column
products over the training set (in batches of at least CHECK_ROWS rows).

Divergence of a run. If every batch curvature C_b is positive semi-definite and its eigenvalues are
below 2s − λ, each step contracts by (1 − λ/s) and adds g (h_0 = g), so ‖h_t‖ ≤ ‖g‖ Σ_{k≤t}
(1 − λ/s)^k ≤ ‖g‖ · min(s/λ, t + 1): bounded by s‖g‖/λ, and without damping (λ = 0) still by
(t + 1)‖g‖. A column whose norm exceeds `divergence_factor` × ‖g‖ · min(s/λ, depth + 1) (or
turns non-finite) is therefore outside the converging regime (for the indefinite true Hessian
the factor leaves room for the extra growth that negative batch curvature allows). `scale:
auto` runs s over `scales` (the authors' list) from the smallest, stopping each attempt at the
first sign of divergence, and keeps the first s under which no column of any repeat diverged;
if none qualifies the method raises instead of returning a diverged result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from tda.config import ConfigError
from tda.exits import DivergedError, RefusedError
from tda.methods.checks import positive, positive_int
from tda.methods.curvature import CurvatureOperator
from tda.methods.damping import raise_multiple_fix
from tda.methods.influence import InfluenceMethod, column_norms, scores_from_solution, solve_side
from tda.methods.progress import Progress
from tda.methods.spectrum import definiteness_tolerance, lanczos_extremes, span_ritz
from tda.problem import AttributionProblem

log = logging.getLogger(__name__)

AUTHORS_SCALES = (10, 20, 50, 100, 150, 200, 250, 300, 400, 500)
CHECK_ROWS = 1024  # training rows per batch of the definiteness checks' full-data products


def lissa_solve(op: CurvatureOperator, G: torch.Tensor, damping: float, scale: float, depth: int, repeat: int,
                batch_size: int, generator: torch.Generator, divergence_factor: float = 10.0,
                check_every: int = 10,
                on_final: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
    """≈ (C + λI)⁻¹ G for G [n_params, k]; raises :class:`tda.exits.DivergedError` (naming the step).
    `on_final`, if given, is called after each repeat that did not diverge with its last
    iterate and last increment (h_depth, h_depth − h_depth−1), both [n_params, k]."""
    n = len(op.x)
    gnorm = column_norms(G)
    bound = divergence_factor * iterate_bound(damping, scale, depth) * gnorm
    total = torch.zeros_like(G)
    Ch = torch.empty_like(G)  # every step's product, in one buffer
    progress = Progress()
    for r in range(repeat):
        h = G.clone()
        for t in range(1, depth + 1):
            if batch_size >= n:  # the whole set: the deterministic Neumann series of C
                Ch = op.matvec(h)
            else:
                Ch = op.batch_matvec(torch.randint(n, (batch_size,), generator=generator), h, out=Ch)
            # the last increment G − (C_b + λI)h/s, formed apart (not as a difference of iterates)
            step = G - Ch / scale - h * (damping / scale) if on_final is not None and t == depth else None
            h.mul_(1 - damping / scale).add_(G).add_(Ch, alpha=-1 / scale)  # G + h − (C_b + λI)h/s, in place
            if t % check_every == 0 or t == depth:
                if progress.due():
                    log.info("lissa: scale %g, repeat %d of %d, step %d of %d", scale, r + 1, repeat, t, depth)
                norms = column_norms(h)
                bad = ~torch.isfinite(norms) | (norms > bound)
                if bad.any():
                    raise DivergedError(f"scale {scale}: {int(bad.sum())} of {len(bad)} columns diverged at step "
                                        f"{t} of repeat {r}")
        if on_final is not None:
            on_final(h, step)
            del step
        total += h / scale
    return total / repeat


def iterate_bound(damping: float, scale: float, depth: int) -> float:
    """min(s/λ, depth + 1): ‖h‖ / ‖g‖ at most over `depth` steps of a recursion that contracts by
    (1 − λ/s) per step (see the module docstring); finite also without damping."""
    return min(scale / damping, depth + 1.0) if damping > 0 else depth + 1.0


class LiSSA(InfluenceMethod):
    """IF score with (C + λI)⁻¹ g_test from the LiSSA recursion; λ = damping_multiple × λ₀.
    `scale` is a number or `auto` (see the module docstring); `lanczos_steps` full-data
    products estimate the smallest eigenvalue of C + λI before the recursion runs. `curvature`
    null: the class's own (gn for LiSSA, hessian for LiSSA-H)."""

    name = "lissa"  # in its messages

    def __init__(self, damping_multiple: float = 100.0, depth: int = 5000, repeat: int = 1,
                 scale: float | str = "auto", scales: list[float] | tuple[float, ...] = AUTHORS_SCALES,
                 batch_size: int = 128, curvature: str | None = None, divergence_factor: float = 10.0,
                 seed: int = 0, chunk_size: int = 256, dtype: str | None = None, lanczos_steps: int = 20):
        super().__init__(damping_multiple, dtype, batch_size, chunk_size, curvature or self.default_curvature,
                         batch_size_means="training rows per recursion step", batch_size_example=128)
        self.depth = positive_int("depth", depth, "recursion steps", 5000)
        self.repeat = positive_int("repeat", repeat, "recursion runs to average", 1)
        if scale != "auto":
            positive("scale", scale, "the recursion's scale s, or 'auto'", 100)
        if isinstance(scales, (str, bytes)) or not hasattr(scales, "__iter__") or len(list(scales)) == 0:
            raise ConfigError(f"method.scales={scales} must be a non-empty list of positive scales; "
                             f"e.g. method.scales=[10,100,500]")
        for v in scales:
            if _bad_scale(v):
                raise ConfigError(f"method.scales={list(scales)} contains {v}; every scale must be a positive number, "
                                 f"e.g. method.scales=[10,100,500]")
        self.scale, self.scales = scale, sorted(float(s) for s in scales)
        self.divergence_factor = positive("divergence_factor", divergence_factor,
                                          "a run diverged once ‖h‖ > factor · s‖g‖/λ", 10.0)
        self.seed = seed
        self.lanczos_steps = positive_int("lanczos_steps", lanczos_steps, "Lanczos steps", 20)

    def scores(self, problem: AttributionProblem) -> torch.Tensor:
        model, dtype, g_test, g_lo, lam = self._prepare(problem)
        op = self._curvature_operator(problem, model, dtype)  # the recursion's mini-batch products
        # the checks' full-data products, in batches of at least CHECK_ROWS rows
        full = self._curvature_operator(problem, model, dtype, max(self.batch_size, CHECK_ROWS))

        def K(V: torch.Tensor) -> torch.Tensor:  # (C + λI) V over the whole training set
            return full.matvec(V).add_(V.to(full.dtype), alpha=lam)

        # before the recursion: Lanczos' extreme Ritz values of C (cached per model), shifted by λ
        with self.phase("check_lanczos"):
            est, cached = self._spectrum(problem, full)
        lanczos_min, lanczos_max = est["min"] + lam, est["max"] + lam
        tol = definiteness_tolerance(lanczos_max, full.dtype)
        spectrum = {"lanczos_min": lanczos_min, "lanczos_max": lanczos_max, "lanczos_steps": est["steps"],
                    "lanczos_exact": est["exact"], "lanczos_cached": cached, "tolerance": tol}
        self.record["spectrum"] = spectrum
        if lanczos_min <= tol:
            self._refuse(lanczos_min, lam, tol, f"{est['steps']} Lanczos steps on the full-data operator")

        solve, other, transposed = solve_side(g_test, g_lo)
        G = solve.T.contiguous()
        k = G.shape[1]
        candidates = self.scales if self.scale == "auto" else [float(self.scale)]
        tried = []
        for s in candidates:
            gen = torch.Generator().manual_seed(int(self.seed))  # same batches for every scale tried
            # after each run: K on the span of its last iterate and increment (a growing
            # direction, if any), and, from the same products, K h for the full-data residual
            finals = {"ritz_min": float("inf"), "Kh": torch.zeros(G.shape, dtype=torch.float64, device=G.device)}

            def on_final(h: torch.Tensor, step: torch.Tensor, finals=finals) -> None:
                with self.phase("check_ritz"):
                    found, Kh = span_ritz(torch.cat([h, step], dim=1), K, first=h.shape[1])
                finals["ritz_min"] = min(finals["ritz_min"], found)
                finals["Kh"] += Kh

            try:
                with self.phase("solve"):
                    X = lissa_solve(op, G, lam, s, self.depth, self.repeat, self.batch_size, gen,
                                    self.divergence_factor, on_final=on_final)
                break
            except DivergedError as err:
                log.info("%s: %s", self.name, err)
                tried.append(str(err))
        else:
            raise RefusedError(f"{self.name}: the recursion diverged for every scale in {candidates} "
                             f"(λ={lam:.3g}): {tried[-1]}. Use larger method.scales (or method.scale), "
                             f"or a larger method.damping_multiple")
        found = finals["ritz_min"]
        KX = finals["Kh"] / (self.repeat * s)  # K x for x = the mean of h/s over the repeats
        residual = (G.double() - KX).norm(dim=0) / G.double().norm(dim=0).clamp_min(1e-300)
        spectrum.update({"recursion_ritz_min": found if found < float("inf") else None,
                         "relative_residual_max": float(residual.max()) if k else 0.0,
                         "relative_residual_mean": float(residual.mean()) if k else 0.0})
        if found <= tol:
            self._refuse(found, lam, tol, f"the smallest Ritz value on the span of the recursion's last iterates and "
                                       f"increments at scale {s:g}")
        self.record.update({"scale": s, "scales_diverged": tried, "curvature": self.curvature,
                            "depth": self.depth, "repeat": self.repeat, "batch_size": self.batch_size,
                            "solved_side": "left_out" if transposed else "test",
                            "curvature_products": op.n_matvecs + full.n_matvecs})
        with self.phase("scores"):
            return scores_from_solution(X, other.to(X.dtype), problem.n_train, transposed).to(torch.float64)

    def _spectrum(self, problem: AttributionProblem, full: CurvatureOperator) -> tuple[dict, bool]:
        """(`lanczos_steps` Lanczos steps on C from the seeded start: its extreme Ritz values,
        whether they came from the cache). On C, not C + λI: the Krylov space is the same and
        every Ritz value moves by λ, so one entry serves every damping of a sweep."""
        settings = {"curvature": self.curvature, "task": problem.task, "dtype": str(full.dtype),
                    "device": full.device.type, "steps": self.lanczos_steps, "seed": int(self.seed),
                    "rows_per_product": full.batch_size}
        computed = []

        def compute() -> dict:
            computed.append(True)
            return lanczos_extremes(full.matvec, full.n_params, self.lanczos_steps,
                                    torch.Generator().manual_seed(int(self.seed)), full.dtype, full.device)

        est = self._cache.json("spectrum", settings, compute)
        return est, not computed

    def _refuse(self, mu: float, lam: float, tol: float, how: str) -> None:
        """The one message for a C + λI that is not positive definite (as CG and Arnoldi word it)."""
        lam0 = self.record["lambda0"]
        need = (lam - mu + tol) / lam0  # the multiple that would only lift the eigenvalue found to the tolerance
        fix = raise_multiple_fix(self.damping_multiple, need)
        if self.curvature == "hessian":
            fix += ", or use the Gauss–Newton curvature (method=lissa, positive semi-definite)"
        raise RefusedError(f"{self.name}: C + λI is not positive definite (curvature={self.curvature}, "
                         f"λ={lam:.3g} = {self.damping_multiple:g}·λ₀): its smallest eigenvalue is ≤ {mu:.3g} "
                         f"{'' if mu <= 0 else f'(within rounding of 0: ≤ {tol:.2g}) '}"
                         f"(found by {how}), so the LiSSA recursion grows along it instead of converging and "
                         f"would return a non-solution. To fix, {fix}")


def _bad_scale(v) -> bool:
    return isinstance(v, bool) or not isinstance(v, (int, float)) or not (float(v) > 0 and float(v) < float("inf"))


class LiSSAH(LiSSA):
    """LiSSA with the true Hessian (docs/method.md §3.4, LiSSA-H)."""

    name = "lissa_h"
    default_curvature = "hessian"
