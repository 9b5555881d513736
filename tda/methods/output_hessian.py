"""Derivatives of the per-example loss in the model's output, in closed form.

The Gauss–Newton products (:mod:`tda.methods.curvature`, :mod:`tda.methods.mlp_curvature`)
and the K-FAC factors (:mod:`tda.methods.kfac`) need the loss only through its gradient and
Hessian Λ in the output, which for the framework's two losses are known in closed form:
cross-entropy (classification, output [b, C]): ∂loss/∂out = p − e_y, Λ = diag(p) − ppᵀ;
squared error (regression, output [b, 1] or [b]): ∂loss/∂out = 2(out − y), Λ = 2.
"""

from __future__ import annotations

import torch


def output_grad(out: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    """∂ loss / ∂ output per row: out [b, C] (regression: [b, 1] or [b]), y [b] -> out's shape."""
    if task == "classification":
        return torch.softmax(out, -1) - torch.nn.functional.one_hot(y, out.shape[-1]).to(out.dtype)
    return 2 * (out.reshape(y.shape) - y).reshape(out.shape)


def output_hessian_sqrt(out: torch.Tensor, task: str) -> torch.Tensor:
    """Columns u_c with Σ_c u_c u_cᵀ = Λ, the Hessian of the loss in the model output.
    out [b, C] -> [b, K, C] (index 1: the column c). Cross-entropy: Λ = diag(p) − ppᵀ and
    u_c = √p_c (e_c − p), K = C, except for two classes, where Λ = p₀p₁ (1, −1)(1, −1)ᵀ has
    rank one and K = 1 column, u = √(p₀p₁) (1, −1), halves the backward passes that use them;
    squared error on [b, 1] / [b]: Λ = 2."""
    if task == "classification":
        p = torch.softmax(out, dim=-1)
        if p.shape[-1] == 2:
            return (p[:, 0] * p[:, 1]).sqrt()[:, None, None] * torch.tensor([1.0, -1.0], dtype=p.dtype,
                                                                            device=p.device)
        eye = torch.eye(p.shape[-1], dtype=p.dtype, device=p.device)
        return p.sqrt().unsqueeze(-1) * (eye.unsqueeze(0) - p.unsqueeze(1))
    if task == "regression":
        flat = out.reshape(len(out), -1)
        eye = torch.eye(flat.shape[1], dtype=out.dtype, device=out.device)
        return (2.0 ** 0.5) * eye.expand(len(out), -1, -1).reshape(len(out), flat.shape[1], *out.shape[1:])
    raise ValueError(f"unknown task {task!r}; expected 'classification' or 'regression'")


def apply_output_hessian(out: torch.Tensor, v: torch.Tensor, task: str) -> torch.Tensor:
    """Λ v per example, without forming Λ. out, v: [b, C] (or [b] for regression)."""
    if task == "classification":
        p = torch.softmax(out, dim=-1)
        return p * v - p * (p * v).sum(-1, keepdim=True)
    if task == "regression":
        return 2.0 * v
    raise ValueError(f"unknown task {task!r}; expected 'classification' or 'regression'")
