"""The K-FAC and EK-FAC factors of a model's Gauss–Newton (the factor pass of :mod:`tda.methods.kfac`,
docs/method.md §3.5): per supported layer (Linear, Conv2d), A = 1/n Σᵢ (1/T) Σ_t a aᵀ and
S = 1/n Σᵢ Σ_c Σ_t δ δᵀ eigendecomposed in float64, for EK-FAC the exact diagonal of the
layer's Gauss–Newton block in that Kronecker eigenbasis (a second pass over the data), and the
exact diagonal for trainable parameters outside supported layers. Cached per model and data
(:mod:`tda.methods.cache`).
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from tda.methods.cache import CurvatureCache
from tda.methods.gradients import to_csr
from tda.methods.layout import ParamLayout, frozen_state, trainable_params
from tda.methods.output_hessian import output_grad, output_hessian_sqrt
from tda.methods.progress import Progress
from tda.models.structure import should_use_sparse
from tda.problem import AttributionProblem

log = logging.getLogger(__name__)


class Layer:
    """A supported layer: its weight (+ bias) as one matrix [d_out, d_in'] in the flat space;
    `w_range` / `b_range`: the (start, stop) of the weight / bias there."""

    def __init__(self, name: str, module: nn.Module, slices: dict[str, slice]):
        self.name, self.module = name, module
        prefix = f"{name}." if name else ""
        self.w = prefix + "weight"
        self.b = prefix + "bias" if module.bias is not None and module.bias.requires_grad else None
        self.w_range = (slices[self.w].start, slices[self.w].stop)
        self.b_range = (slices[self.b].start, slices[self.b].stop) if self.b else None
        self.d_out = module.weight.shape[0]
        self.d_in = module.weight[0].numel() + (1 if self.b else 0)

    def patches(self, inp: torch.Tensor) -> torch.Tensor:
        """Layer input -> a [b, T, d_in']."""
        m = self.module
        if isinstance(m, nn.Conv2d):
            a = F.unfold(inp, m.kernel_size, m.dilation, m.padding, m.stride).transpose(1, 2)
        else:
            a = inp.reshape(len(inp), -1, inp.shape[-1])
        if self.b:
            a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=2)
        return a

    def out_grads(self, d: torch.Tensor) -> torch.Tensor:
        """Gradient w.r.t. the layer output -> δ [b, T, d_out]."""
        if isinstance(self.module, nn.Conv2d):
            return d.flatten(2).transpose(1, 2)
        return d.reshape(len(d), -1, d.shape[-1])

    def to_matrix(self, V: torch.Tensor) -> torch.Tensor:
        """Flat rows [k, n_params] -> [k, d_out, d_in']."""
        W = V[:, self.w_range[0]:self.w_range[1]].reshape(len(V), self.d_out, -1)
        if self.b:
            W = torch.cat([W, V[:, self.b_range[0]:self.b_range[1]].unsqueeze(2)], dim=2)
        return W

    def from_matrix(self, M: torch.Tensor, out: torch.Tensor) -> None:
        w = M[:, :, :-1] if self.b else M
        out[:, self.w_range[0]:self.w_range[1]] = w.reshape(len(M), -1)
        if self.b:
            out[:, self.b_range[0]:self.b_range[1]] = M[:, :, -1]


def find_layers(model: nn.Module, layout: ParamLayout) -> tuple[list[Layer], list[str]]:
    """(supported layers, names of trainable parameters left to the diagonal)."""
    slices = layout.slices()
    layers = []
    for name, m in model.named_modules():
        ok = isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"
                                          and not isinstance(m.padding, str))
        if ok and m.weight.requires_grad:
            layers.append(Layer(name, m, slices))
    covered = {p for layer in layers for p in (layer.w, layer.b) if p}
    return layers, [k for k in layout.names if k not in covered]


def compute_factors(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str, kind: str,
                    batch_size: int = 512, memory_budget_mb: float | None = None,
                    lambda0: dict | None = None) -> dict[str, torch.Tensor]:
    """Eigendecomposed factors over all rows (float64): per layer `<l>.QA/.QS/.eA/.eS` and, for
    EK-FAC, `<l>.lam`; `diag.<param>` for the other trainable parameters. `memory_budget_mb`
    bounds EK-FAC's per-example gradient matrices for layers applied at several positions
    (convolutions, sequences), which are formed for a few rows of a batch at a time.

    `lambda0`: if given, and every trainable parameter belongs to a layer applied once per
    example, the pass also backpropagates each batch's loss gradient and sets
    `lambda0["lambda0"]` = Σᵢ‖gᵢ‖² / (n · n_params) (a layer's gradient δ aᵀ has squared norm
    ‖δ‖²‖a‖², its bias included in a): :func:`tda.methods.damping.base_damping`'s λ₀, summed
    in this pass's batches."""
    model.eval()
    layout = ParamLayout.of(model)
    layers, others = find_layers(model, layout)
    dev = next(model.parameters()).device
    A = {layer.name: torch.zeros(layer.d_in, layer.d_in, dtype=torch.float64, device=dev) for layer in layers}
    S = {layer.name: torch.zeros(layer.d_out, layer.d_out, dtype=torch.float64, device=dev) for layer in layers}
    n = len(x)
    sparse: dict[str, bool] = {}  # one-hot inputs (per layer, decided on the first batch)
    squared_norms = {"batches": [], "factorable": lambda0 is not None and not others}  # Σᵢ‖gᵢ‖² per batch

    def batches(what: str, norms: bool = False):
        """Every batch's (a [b,T,d_in'], δ [b,C,T,d_out]) per layer; with `norms`, the sum of its
        squared per-example loss gradients into `squared_norms`."""
        progress = Progress()
        for i in range(0, n, batch_size):
            if progress.due():
                log.info("%s: %s, row %d of %d", kind, what, i, n)
            xb = x[i:i + batch_size].to(dev)
            inputs, outputs = {}, {}

            def keep(name):
                def hook(mod, inp, out):  # must return None: a returned value replaces the output
                    inputs[name], outputs[name] = inp[0].detach(), out  # noqa: B023 - called within this iteration
                return hook

            hooks = [layer.module.register_forward_hook(keep(layer.name)) for layer in layers]
            try:
                with torch.enable_grad():
                    out = model(xb)
            finally:
                for h in hooks:
                    h.remove()
            U = output_hessian_sqrt(out.detach(), task)  # [b, C, ...]
            outs = [outputs[layer.name] for layer in layers]
            deltas = {layer.name: [] for layer in layers}
            for c in range(U.shape[1]):
                gs = torch.autograd.grad(out, outs, grad_outputs=U[:, c].reshape(out.shape), retain_graph=True)
                for layer, g in zip(layers, gs):
                    deltas[layer.name].append(layer.out_grads(g))
            batch = {layer.name: (layer.patches(inputs[layer.name]), torch.stack(deltas[layer.name], dim=1))
                     for layer in layers}
            for layer in layers:
                if layer.name not in sparse:
                    a = batch[layer.name][0]
                    sparse[layer.name] = a.shape[1] == 1 and should_use_sparse(a[:, 0], "auto")
            # a layer applied at several positions: ‖Σ_t δ_t a_tᵀ‖² does not factorise
            squared_norms["factorable"] &= all(a.shape[1] == 1 for a, _ in batch.values())
            if norms and squared_norms["factorable"]:
                yb = y[i:i + batch_size].to(dev)
                gs = torch.autograd.grad(out, outs, grad_outputs=output_grad(out.detach(), yb, task))
                # per row in the model's dtype (as base_damping's factored chunks), summed in float64
                squared_norms["batches"].append(sum(
                    float((layer.out_grads(g)[:, 0].pow(2).sum(1).double()
                           * batch[layer.name][0][:, 0].pow(2).sum(1).double()).sum()) for layer, g in zip(layers, gs)))
            yield batch

    def kept_batches(kept: list[dict], what: str):
        """The kept batches again, with the progress lines of a pass."""
        progress = Progress()
        for j, batch in enumerate(kept):
            if progress.due():
                log.info("%s: %s, row %d of %d", kind, what, j * batch_size, n)
            yield batch

    # EK-FAC's second pass needs the same a and δ again: kept from the first pass when every
    # layer sees one vector per example and they take under a quarter of the memory budget
    # (the Folktables-sized MLP: ~190 MB for 30,085 rows), else recomputed
    kept: list[dict] | None = [] if kind == "ekfac" else None
    for batch in batches("factor pass", norms=True):
        for layer in layers:
            a, d = batch[layer.name]
            # each batch's products in the model's dtype (float32 GEMMs are the faster kind on
            # CPU), summed over batches in float64
            if sparse[layer.name]:
                # one-hot rows (Folktables: 11 non-zeros of 792 with the bias column): aᵀa costs
                # its non-zeros, not d_in² per row
                A[layer.name] += (a[:, 0].T.to_sparse() @ a[:, 0]).double()
            else:  # Σ over rows and positions as one GEMM (einsum's batched route is slower here)
                a2 = a.reshape(-1, a.shape[-1])
                A[layer.name] += (a2.T @ a2).double() / a.shape[1]
            d2 = d.reshape(-1, d.shape[-1])
            S[layer.name] += (d2.T @ d2).double()
        if kept is not None:
            kept.append(batch)
            per_batch = sum(t.numel() * t.element_size() for a, d in batch.values() for t in (a, d))
            if any(a.shape[1] > 1 for a, _ in batch.values()) or (
                    memory_budget_mb is not None and per_batch * -(-n // batch_size) > memory_budget_mb * 2**18):
                kept = None
    out: dict[str, torch.Tensor] = {}
    for layer in layers:
        eA, QA = torch.linalg.eigh(A[layer.name] / n)
        eS, QS = torch.linalg.eigh(S[layer.name] / n)
        out.update({f"{layer.name}.QA": QA, f"{layer.name}.QS": QS, f"{layer.name}.eA": eA, f"{layer.name}.eS": eS})
    if kind == "ekfac":
        lam = {layer.name: torch.zeros(layer.d_out, layer.d_in, dtype=torch.float64, device=dev) for layer in layers}
        what = "eigenvalue correction pass"
        for batch in kept_batches(kept, what) if kept is not None else batches(what):
            for layer in layers:
                a, d = batch[layer.name]
                QA, QS = out[f"{layer.name}.QA"], out[f"{layer.name}.QS"]
                a64, d64 = a.double(), d.double()
                if a.shape[1] == 1:  # M = δ aᵀ: the rotated square is an outer product of squares
                    a1 = to_csr(a64[:, 0]) if sparse[layer.name] else a64[:, 0]  # CSR: faster products than COO
                    ar, dr = (a1 @ QA).pow_(2), (d64[:, :, 0] @ QS).pow_(2).sum(1)  # [b, d_in'], [b, d_out]
                    lam[layer.name] += dr.T @ ar
                else:
                    # M is [rows, C, d_out, d_in'] float64 and its rotation holds two more of its
                    # size (~14 GB for 512 rows of a MiniLM feed-forward layer): rows in chunks
                    # within the budget
                    per_row = 3 * d.shape[1] * layer.d_out * a.shape[-1] * 8
                    rows = len(a) if memory_budget_mb is None else max(1, int(memory_budget_mb * 2**20 // per_row))
                    for r in range(0, len(a), rows):
                        M = torch.einsum("bcto,bti->bcoi", d64[r:r + rows], a64[r:r + rows])
                        lam[layer.name] += ((QS.T @ M @ QA) ** 2).sum((0, 1))
        del kept
        for layer in layers:
            out[f"{layer.name}.lam"] = lam[layer.name] / n
    if squared_norms["factorable"]:
        lambda0["lambda0"] = sum(squared_norms["batches"]) / (n * layout.n_params)
    if others:
        out.update(diagonal_gn(model, others, x, task, batch_size))
    return out


def diagonal_gn(model: nn.Module, names: list[str], x: torch.Tensor, task: str,
                batch_size: int) -> dict[str, torch.Tensor]:
    """Exact diagonal of the Gauss–Newton for the trainable parameters `names`: 1/n Σᵢ Σ_c (Jᵢᵀu_ic)²,
    each flattened [size]."""
    params = trainable_params(model)
    sub = {k: params[k] for k in names}
    const = {**{k: v for k, v in params.items() if k not in sub}, **frozen_state(model)}
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in sub.items()}
    dev = next(iter(sub.values())).device

    def fwd(p, xi):
        return functional_call(model, (p, const), (xi.unsqueeze(0),)).squeeze(0)

    def pseudo(p, xi, u):
        return (fwd(p, xi) * u).sum()

    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(dev)
        with torch.no_grad():
            out = functional_call(model, (sub, const), (xb,))
        U = output_hessian_sqrt(out, task)
        for c in range(U.shape[1]):
            g = vmap(grad(pseudo), in_dims=(None, 0, 0))(sub, xb, U[:, c].reshape(out.shape))
            for k in names:
                total[k] += g[k].double().pow(2).sum(0)
    return {f"diag.{k}": v.reshape(-1) / len(x) for k, v in total.items()}


def load_or_compute_factors(problem: AttributionProblem, model: nn.Module, kind: str, batch_size: int,
                            record: dict, cache: CurvatureCache,
                            lambda0: dict | None = None) -> dict[str, torch.Tensor]:
    """The factors of `model` on the problem's training set, from `cache` (entry
    `<kind>-factors`, keyed by model, data, task and batch size) or computed and stored (with
    λ₀ into `lambda0` on the way where possible: :func:`compute_factors`); `record` says which
    (`factors_cached`, `factors_path`, `factors_seconds`)."""
    t0 = time.perf_counter()
    settings = {"kind": kind, "task": problem.task, "batch_size": batch_size}
    factors, path, cached = cache.tensors(f"{kind}-factors", settings, lambda: compute_factors(
        model, problem.x_train, problem.y_train, problem.task, kind, batch_size, problem.memory_budget_mb, lambda0))
    record.update({"factors_cached": cached} | ({} if cached else {"factors_seconds": time.perf_counter() - t0})
                  | ({"factors_path": str(path)} if path is not None else {}))
    dev = next(model.parameters()).device
    return {k: v.to(dev) for k, v in factors.items()}
