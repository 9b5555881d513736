"""The damping of the influence-function methods: λ = damping_multiple × λ₀ (docs/method.md §3.3).

λ₀ is a scale of the curvature, the mean squared entry of the per-example training gradients
(Grosse et al.), so that one `damping_multiple` means the same on every model and dataset. It
is a pass over the whole training set, cached per model and data (:mod:`tda.methods.cache`) so
that a sweep over the multiple computes it once.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tda.exits import RefusedError
from tda.methods.cache import CurvatureCache
from tda.methods.gradients import factorable_linears, iter_grad_chunks, loss_target, tensor_sq_norms
from tda.methods.layout import ParamLayout


def base_damping(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str, chunk_size: int = 256,
                 cache_dir: Path | None = None, memory_budget_mb: float = 256.0,
                 cache: CurvatureCache | None = None) -> float:
    """λ₀ = the mean of the squared entries of the per-example training gradients (docs/method.md §3.3,
    Grosse et al.) = Σᵢ‖gᵢ‖² / (n · n_params). Only the squared norms are needed, so linear
    layers give them from their factors (‖b aᵀ‖² = ‖a‖²‖b‖²) without forming any gradient, in
    chunks as large as `memory_budget_mb` allows; other models stream dense chunks of at most
    `chunk_size` rows. Cached as the entry `lambda0` of `cache` (default: one for `cache_dir`,
    keyed by model and data)."""
    cache = cache or CurvatureCache(cache_dir, model, x, y)

    def compute() -> dict:
        total = 0.0
        # factored chunks hold a few activations per row, not gradients: as many rows as the budget allows
        max_rows = None if factorable_linears(model) else chunk_size
        for _, g in iter_grad_chunks(model, x, y, loss_target(task), memory_budget_mb, max_rows=max_rows):
            total += float(sum(v.double().sum() for v in tensor_sq_norms(g).values()))
        return {"lambda0": total / (len(x) * ParamLayout.of(model).n_params), "n_rows": len(x)}

    return checked_lambda0(float(cache.json("lambda0", {"task": task}, compute)["lambda0"]))


def checked_lambda0(lam0: float) -> float:
    """λ₀ if it is positive, else a refusal (every training loss is flat)."""
    if not lam0 > 0:
        raise RefusedError("λ₀ (mean squared per-example gradient entry) is 0: every training loss is flat; "
                         "set damping explicitly with method.damping_multiple and a non-degenerate model")
    return lam0


def resolve_damping(multiple: float, lam0: float, record: dict) -> float:
    """λ = multiple × λ₀, recorded in `record` with both factors."""
    lam = float(multiple) * lam0
    if not lam >= 0:
        raise RefusedError(f"method.damping_multiple={multiple} gives λ={lam}; use a value ≥ 0")
    record.update({"lambda0": lam0, "damping_multiple": float(multiple), "damping": lam})
    return lam


def raise_multiple_fix(now: float, need: float) -> str:
    """The fix for a damped curvature that is not positive definite, where a multiple of `need`
    would only just lift its smallest eigenvalue to the tolerance: "raise method.damping_multiple
    (now …) well above <need>, e.g. method.damping_multiple=<twice that, at least 1>"."""
    suggest = float(f"{max(2 * need, 1.0):.2g}")
    return (f"raise method.damping_multiple (now {now:g}) well above {need:.3g}, e.g. "
            f"method.damping_multiple={suggest:g}")
