"""The influence function with the correction term of the paper's Proposition 1 (docs/method.md §3.8),
for a final model θᶠ that is not a minimum of the training loss.

Derivation. Model further training from θᶠ by the damped quadratic model of the mean
training loss, with j down-weighted by ε (ε = 1/n removes it):

    L_ε(θᶠ + δ) ≈ L_ε(θᶠ) + (ḡ − ε g_j)ᵀ δ + ½ δᵀ (C − ε C_j) δ + (λ/2) ‖δ‖²,

where ḡ = ∇ of the mean training loss at θᶠ, C its curvature (Gauss–Newton or Hessian), g_j
and C_j = ∇²loss(z_j) those of z_j alone. Its minimiser, the predicted displacement of
long further training, is

    δ(ε) = −(C + λI − ε C_j)⁻¹ (ḡ − ε g_j).

Differentiating at ε = 0 with d(K − εC_j)⁻¹/dε = K⁻¹ C_j K⁻¹, K = C + λI:

    dδ/dε = K⁻¹ g_j − K⁻¹ C_j K⁻¹ ḡ = K⁻¹ (g_j + C_j Δθ(D)),   Δθ(D) = δ(0) = −K⁻¹ ḡ,

the full-data further-training displacement. To first order in ε = 1/n the test loss
changes by g_testᵀ (δ(1/n) − δ(0)), so

    score(z, j) = g_testᵀ K⁻¹ (g_j + C_j Δθ(D)) / n,

the plain IF plus Proposition 1's term K⁻¹ ∇²loss(z_j) Δθ(D). At a minimum (ḡ = 0,
λ = 0) the term vanishes. As in the plain IF, g_test is taken at θᶠ (the form of docs/method.md §3.8).

Computation: one block-CG solve for [g_test columns | ḡ] (the same operator), one
per-example curvature product C_j Δθ(D) for each left-out j, and dot products.
"""

from __future__ import annotations

import torch

from tda.exits import RefusedError
from tda.methods.cg import CG, block_cg
from tda.methods.curvature import mean_grad
from tda.problem import AttributionProblem


class IFCorrected(CG):
    """The IF score plus Proposition 1's correction [n_test, n_left_out], CG's settings (the
    test side is always the one solved, with ḡ as one more column; `block` is not used)."""

    def scores(self, problem: AttributionProblem) -> torch.Tensor:
        model, dtype, g_test, g_lo, lam = self._prepare(problem)
        op = self._curvature_operator(problem, model, dtype)
        with self.phase("gradients"):
            gbar = mean_grad(model, problem.x_train, problem.y_train, problem.task, self.batch_size, dtype)
        B = torch.cat([g_test.T, gbar[:, None]], dim=1).to(op.device, dtype)
        with self.phase("solve"):
            X, info = block_cg(op.matvec, B, lam, self.tol, self.maxiter)
        if info["breakdown"]:
            raise RefusedError(f"if_corrected: C + λI is not positive definite (curvature={self.curvature}, "
                             f"λ={lam:.3g}); use method.curvature=gn or a larger method.damping_multiple")
        s_test, delta = X[:, :-1], -X[:, -1]  # K⁻¹g_test [n_params, n_test], Δθ(D) [n_params]
        with self.phase("scores"):
            c_delta = op.per_example_matvec(problem.x_left_out, problem.y_left_out, delta)  # [n_left_out, n_params]
            plain = s_test.T @ g_lo.to(dtype).T / problem.n_train
            correction = s_test.T @ c_delta.T / problem.n_train
        ratio = float(correction.norm() / plain.norm().clamp_min(1e-300))
        self.record.update({"cg": info, "curvature": self.curvature, "displacement_norm": float(delta.norm()),
                            "mean_grad_norm": float(gbar.norm()), "correction_to_plain_norm_ratio": ratio})
        return (plain + correction).to(torch.float64)
