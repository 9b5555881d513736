"""K-FAC and EK-FAC influence functions (docs/method.md §3.5; Grosse et al. 2023, "Studying Large Language
Model Generalization with Influence Functions").

The Gauss–Newton G = 1/n Σᵢ Σ_c (Jᵢᵀu_ic)(Jᵢᵀu_ic)ᵀ (u_ic the columns of Λᵢ^{1/2}, see
`output_hessian_sqrt`) is approximated block-diagonally, one block per Linear / Conv2d layer.
For such a layer the pseudo-gradient of example i, column c, is the matrix
M_ic = Σ_t δ_ict a_itᵀ [d_out, d_in (+1 for the bias)] over positions t (1 for a plain
Linear; sequence positions for Linear on [b, T, d]; output pixels of a Conv2d, with a the
unfolded input patch). K-FAC (spatial independence, KFC for convolutions):

    G_l ≈ A ⊗ S,   A = 1/n Σᵢ (1/T) Σ_t a aᵀ,   S = 1/n Σᵢ Σ_c Σ_t δ δᵀ,

exact for a single Linear layer with squared error (there Λ = 2 and δ does not depend on
the example). A = Q_A diag(e_A) Q_Aᵀ and S = Q_S diag(e_S) Q_Sᵀ are eigendecomposed in
float64. K-FAC's eigenvalues are e_S e_Aᵀ; EK-FAC replaces them by the exact diagonal of G_l
in the Kronecker eigenbasis, Λ = 1/n Σᵢ Σ_c (Q_Sᵀ M_ic Q_A)² (a second pass). Then

    (G_l + λI)⁻¹ vec(V) = vec(Q_S [(Q_Sᵀ V Q_A) / (Λ + λ)] Q_Aᵀ).

Trainable parameters outside supported layers (batch norm, layer norm, embeddings, grouped
convolutions) get the exact diagonal of G (1/n Σᵢ Σ_c (Jᵢᵀu_ic)²), recorded in `record`.
The factor pass is :mod:`tda.methods.kfac_factors`; factors are cached in `problem.cache_dir`
(safetensors, keyed by model, data, kind and batch size, checked on load: :mod:`tda.methods.cache`),
so a sweep over damping computes them once.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from tda.exits import RefusedError
from tda.methods.cache import CurvatureCache
from tda.methods.damping import base_damping, checked_lambda0, raise_multiple_fix, resolve_damping
from tda.methods.gradients import FactoredGrads, NotFactorable, compute_grads, loss_target
from tda.methods.influence import InfluenceMethod, solve_side
from tda.methods.kfac_factors import Layer, find_layers, load_or_compute_factors
from tda.methods.layout import ParamLayout
from tda.methods.spectrum import definiteness_tolerance
from tda.problem import AttributionProblem

log = logging.getLogger(__name__)


def kronecker_eigenvalues(factors: dict[str, torch.Tensor], layer: Layer, kind: str) -> torch.Tensor:
    """The layer's eigenvalues of G̃ in its Kronecker eigenbasis [d_out, d_in']: EK-FAC's
    corrected ones, or K-FAC's products e_S e_Aᵀ."""
    if kind == "ekfac":
        return factors[f"{layer.name}.lam"]
    return torch.outer(factors[f"{layer.name}.eS"], factors[f"{layer.name}.eA"])


def inverse_apply(model: nn.Module, factors: dict[str, torch.Tensor], kind: str, V: torch.Tensor,
                  damping: float) -> torch.Tensor:
    """(G̃ + λI)⁻¹ applied to the rows of V [k, n_params] (block-diagonal K-FAC / EK-FAC)."""
    layout = ParamLayout.of(model)
    layers, others = find_layers(model, layout)
    out = torch.empty_like(V)
    V64 = V.double()
    for layer in layers:
        QA, QS = factors[f"{layer.name}.QA"], factors[f"{layer.name}.QS"]
        lam = kronecker_eigenvalues(factors, layer, kind)
        R = QS.T @ layer.to_matrix(V64) @ QA
        layer.from_matrix((QS @ (R / (lam + damping)) @ QA.T).to(V.dtype), out)
    slices = layout.slices()
    for k in others:
        out[:, slices[k]] = (V64[:, slices[k]] / (factors[f"diag.{k}"] + damping)).to(V.dtype)
    return out


def factored_scores(layers: list[Layer], factors: dict[str, torch.Tensor], kind: str, g_test: FactoredGrads,
                    g_lo: FactoredGrads, damping: float, scratch_mb: float = 4.0) -> torch.Tensor:
    """Σ_l g_test,lᵀ (G̃_l + λI)⁻¹ g_j,l for every pair [n_test, n_left_out], float64, from the
    per-example factors of linear layers. In the Kronecker eigenbasis a per-example weight
    gradient b aᵀ becomes (QSᵀb)(QAᵀa)ᵀ, so each example costs two small rotations instead of
    the d_out × d_in' products :func:`inverse_apply` spends on a dense gradient; the damped
    eigenvalues then weight the pairs: Σ_{o,i} bt_o at_i bj_o aj_i / (Λ_oi + λ). The weighted
    [test rows, d_out, d_in'] block is formed `scratch_mb` at a time: pieces that stay in the
    CPU's cache are faster than one large block (docs/methods.md)."""
    def by_weight(g):
        return {lf.weight: lf for lf in g.layers}

    tests, lefts = by_weight(g_test), by_weight(g_lo)
    total = torch.zeros(len(g_test), len(g_lo), dtype=torch.float64, device=factors[f"{layers[0].name}.QA"].device)
    for layer in layers:
        QA, QS = factors[f"{layer.name}.QA"], factors[f"{layer.name}.QS"]
        W = 1.0 / (kronecker_eigenvalues(factors, layer, kind) + damping)  # [d_out, d_in']

        def rotate(lf):
            a = lf.A.to_dense() if lf.A.layout != torch.strided else lf.A
            a = a.double()
            if layer.b:  # noqa: B023 - called within this iteration
                a = torch.cat([a, a.new_ones(len(a), 1)], dim=1)
            return lf.B.double() @ QS, a @ QA  # [n, d_out], [n, d_in']  # noqa: B023 - called within this iteration

        bt, at = rotate(tests[layer.w])
        bj, aj = rotate(lefts[layer.w])
        rows = max(1, int(scratch_mb * 2**20 // (8 * W.numel())))
        for r in range(0, len(bt), rows):
            X = (bt[r:r + rows, :, None] * W).mul_(at[r:r + rows, None, :])  # [t, d_out, d_in']
            Y = (X.reshape(-1, X.shape[-1]) @ aj.T).reshape(len(X), layer.d_out, len(aj))  # [t, d_out, j]
            total[r:r + rows] += (Y * bj.T).sum(1)
    return total


def _factored_grads(problem: AttributionProblem, model: nn.Module, layers: list[Layer], others: list[str]):
    """(test, left-out) FactoredGrads when every trainable parameter is a weight or bias of a
    linear layer applied once per example; else None (the dense path)."""
    if others or any(not isinstance(layer.module, nn.Linear) for layer in layers):
        return None
    target = loss_target(problem.task)
    try:
        return (compute_grads(model, problem.x_test, problem.y_test, target, factored=True),
                compute_grads(model, problem.x_left_out, problem.y_left_out, target, factored=True))
    except NotFactorable:
        return None


class EKFAC(InfluenceMethod):
    """IF score with the EK-FAC (or K-FAC, `kind: kfac`) approximation of (G + λI)⁻¹, G the
    Gauss–Newton; `batch_size`: training rows per factor batch. `dtype` null takes the factored
    path for linear layers (scores from per-example factors, no gradient formed)."""

    kind = "ekfac"

    def __init__(self, damping_multiple: float = 100.0, batch_size: int = 512, chunk_size: int = 256,
                 dtype: str | None = None):
        super().__init__(damping_multiple, dtype, batch_size, chunk_size,
                         batch_size_means="training rows per factor batch", batch_size_example=512)

    def scores(self, problem: AttributionProblem) -> torch.Tensor:
        model = problem.model.to(problem.device)
        model.eval()
        layers, others = find_layers(model, ParamLayout.of(model))
        self.record.update({"kind": self.kind, "diagonal_params": others})
        with self.phase("gradients"):
            grads = _factored_grads(problem, model, layers, others) if self.dtype is None else None
        if grads is not None:
            self._cache = CurvatureCache(problem.cache_dir, model, problem.x_train, problem.y_train)
            with self.phase("factors"):
                factors, lam0 = self._factors_and_lambda0(problem, model)
            lam = resolve_damping(self.damping_multiple, lam0, self.record)
            self._require_positive_definite(factors, layers, others, lam)
            self.record["factored_scores"] = True
            with self.phase("scores"):
                return factored_scores(layers, factors, self.kind, *grads, lam) / problem.n_train
        model, _, g_test, g_lo, lam = self._prepare(problem)
        with self.phase("factors"):
            factors = load_or_compute_factors(problem, model, self.kind, self.batch_size, self.record, self._cache)
        self._require_positive_definite(factors, layers, others, lam)
        self.record["factored_scores"] = False
        with self.phase("scores"):
            solve, other, transposed = solve_side(g_test, g_lo)
            X = inverse_apply(model, factors, self.kind, solve.double(), lam)  # [k, n_params]
            s = other.double() @ X.T / problem.n_train  # [m, k]
            return (s.T if not transposed else s).contiguous()

    def _require_positive_definite(self, factors: dict[str, torch.Tensor], layers: list[Layer], others: list[str],
                                   lam: float) -> None:
        """Refuse a damped approximation G̃ + λI that is not positive definite: its eigenvalues are
        known exactly (each block's, and the diagonal's), and one at or below rounding of 0 (with
        too little damping, e.g. `damping_multiple=0` on a layer whose inputs span fewer
        directions than it has) would divide by zero or flip signs instead of scoring."""
        blocks = [kronecker_eigenvalues(factors, layer, self.kind) for layer in layers]
        blocks += [factors[f"diag.{k}"] for k in others]
        lowest = min(float(b.min()) for b in blocks) + lam
        top = max(float(b.max()) for b in blocks) + lam
        self.record["damped_eigenvalue_min"] = lowest
        if lowest <= definiteness_tolerance(top, torch.float64):
            need = (definiteness_tolerance(top, torch.float64) - lowest + lam) / self.record["lambda0"]
            raise RefusedError(
                f"{self.kind}: G̃ + λI is not positive definite (λ={lam:.3g} = {self.damping_multiple:g}·λ₀): its "
                f"smallest eigenvalue is {lowest:.3g} (largest {top:.3g}), so (G̃ + λI)⁻¹ divides by zero or flips "
                f"signs. To fix, {raise_multiple_fix(self.damping_multiple, need)}")

    def _factors_and_lambda0(self, problem: AttributionProblem, model: nn.Module) -> tuple[dict, float]:
        """(the factors, λ₀), λ₀ summed by the factor pass itself when it runs (one more backward
        per batch instead of a pass of its own: the same mean squared gradient entry, in the
        pass's batches) and cached beside them as `lambda0` for this batch size; else
        :func:`base_damping`'s."""
        settings = {"task": problem.task, "summed_by": f"factor pass, batch {self.batch_size}"}
        lam0 = self._cache.get_json("lambda0", settings)
        from_pass = {} if lam0 is None else None
        factors = load_or_compute_factors(problem, model, self.kind, self.batch_size, self.record, self._cache,
                                          from_pass)
        if lam0 is None and from_pass:
            lam0 = self._cache.json("lambda0", settings, lambda: {**from_pass, "n_rows": problem.n_train})
        if lam0 is None:
            with self.phase("lambda0"):
                return factors, base_damping(model, problem.x_train, problem.y_train, problem.task, self.chunk_size,
                                             cache=self._cache)
        self.record["lambda0_from_factor_pass"] = True
        return factors, checked_lambda0(float(lam0["lambda0"]))


class KFAC(EKFAC):
    """K-FAC: EK-FAC's factors without the eigenvalue correction (eigenvalues e_S e_Aᵀ)."""

    kind = "kfac"
