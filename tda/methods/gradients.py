"""Per-example gradients of the trainable model, materialised or factored, in chunks.

Everything here works on the model in eval mode (dropout off, batch norm with its running
statistics), as attribution at the final model requires; in eval mode the examples of a
batch do not interact, which is what makes per-example quantities well defined.

Two representations of the per-example gradients of a set of examples:

- **dense** (:class:`DenseGrads`): the flattened gradients [n, n_params] (trainable
  parameters in `named_parameters` order), from `torch.func` (`vmap(grad(...))`). Works for
  every model of the framework.
- **factored** (:class:`FactoredGrads`): when every trainable parameter is the weight or bias
  of an `nn.Linear` applied to one vector per example, the per-example gradient of the
  weight is the outer product b_i a_iᵀ of the layer's output gradient b_i [d_out] and its
  input a_i [d_in]; the bias gradient is b_i. Inner products then factor:
  ⟨g_{i,W}, g_{j,W}⟩ = (a_iᵀa_j)(b_iᵀb_j), so kernels over thousands of training rows cost
  O(n·(d_in + d_out)) per row instead of O(n·d_in·d_out), and nothing of size n_params is
  ever held per example. One-hot tabular inputs make a_i of the first layer sparse; sums of
  squared gradients and random projections exploit that (:func:`as_sparse_if_sparse`).

Both expose per-parameter-tensor blocks (`tensor_names`, :func:`tensor_kernels`,
:func:`tensor_sq_norms`), so methods are written once. :func:`iter_grad_chunks` streams the
training set in chunks sized by a memory budget.

Public helpers (also used by the influence-function methods):
  per_example_grads, per_example_target_grads, loss_target, margin_target, chunk_rows,
  compute_grads, iter_grad_chunks, DenseGrads, FactoredGrads, linear_factors,
  factorable_linears, tensor_kernels, tensor_sq_norms, tensor_moments. The flat layout of
  the gradients is :class:`tda.methods.layout.ParamLayout`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from tda.methods.layout import ParamLayout, frozen_state, trainable_params
from tda.models.base import per_example_loss

# A "target" maps (model output [n, ...], labels [n]) to one scalar per example [n].
Target = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def loss_target(task: str) -> Target:
    """The training loss g(z, θ) of docs/method.md §2, per example."""
    return lambda out, y: per_example_loss(out, y, task)


def margin_target(task: str) -> Target:
    """TRAK's output function. Classification: the margin f = logit_y − logsumexp_{c≠y} logit_c,
    for which loss = softplus(−f) and dloss/df = −(1 − p_y). Regression: the output itself."""
    if task == "regression":
        return lambda out, y: out.reshape(y.shape)
    if task != "classification":
        raise ValueError(f"unknown task {task!r}; expected 'classification' or 'regression'")

    def margin(out, y):
        correct = out.gather(1, y.view(-1, 1)).squeeze(1)
        others = out.scatter(1, y.view(-1, 1), float("-inf"))
        return correct - torch.logsumexp(others, dim=1)

    return margin


# ----------------------------------------------------------------------------- dense (torch.func)
def per_example_target_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: Target,
                             chunk_size: int = 256) -> torch.Tensor:
    """Flattened per-example gradients of `target`, shape [n, n_params] (trainable parameters,
    in `named_parameters` order), computed with vmap(grad) in chunks of `chunk_size` rows."""
    model.eval()
    params = trainable_params(model)
    const = frozen_state(model)

    def target_one(p, xi, yi):
        out = functional_call(model, (p, const), (xi.unsqueeze(0),))
        return target(out, yi.unsqueeze(0)).squeeze(0)

    g = vmap(grad(target_one), in_dims=(None, 0, 0))
    device = next(iter(params.values())).device
    rows = []
    for i in range(0, len(x), chunk_size):
        gi = g(params, x[i:i + chunk_size].to(device), y[i:i + chunk_size].to(device))
        rows.append(torch.cat([gi[k].flatten(1) for k in params], dim=1))
    if not rows:
        return torch.zeros(0, ParamLayout.of(model).n_params)
    return torch.cat(rows)


def per_example_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str,
                      chunk_size: int = 256) -> torch.Tensor:
    """Flattened per-example loss gradients, shape [n, n_params] (trainable parameters,
    in `named_parameters` order)."""
    return per_example_target_grads(model, x, y, loss_target(task), chunk_size)


@dataclass
class DenseGrads:
    """Materialised per-example gradients G [n, n_params] with their layout."""

    G: torch.Tensor
    layout: ParamLayout

    def __len__(self) -> int:
        return self.G.shape[0]

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return self.layout.names

    def block(self, name: str) -> torch.Tensor:
        """[n, size of tensor `name`]"""
        return self.G[:, self.layout.slices()[name]]

    def dense(self) -> torch.Tensor:
        return self.G


# ----------------------------------------------------------------------------- factored (linear)
class NotFactorable(Exception):  # noqa: N818 - the condition callers test to fall back to dense
    """The model's trainable parameters are not all weights/biases of per-example `nn.Linear`s."""


def factorable_linears(model: nn.Module) -> list[tuple[str, nn.Linear]] | None:
    """The `nn.Linear` modules holding trainable parameters, or None when some trainable
    parameter belongs to anything else (convolutions, batch norm, embeddings, ...)."""
    owners: dict[str, tuple[str, nn.Module]] = {}
    for mod_name, mod in model.named_modules():
        for p_name, _ in mod.named_parameters(recurse=False):
            owners[f"{mod_name}.{p_name}" if mod_name else p_name] = (mod_name, mod)
    linears: dict[str, nn.Linear] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        mod_name, mod = owners[name]
        if type(mod) is not nn.Linear:
            return None
        linears[mod_name] = mod
    return list(linears.items())


@dataclass
class LayerFactors:
    """One linear layer's per-example factors: A [n, d_in] (inputs; possibly sparse COO/CSR)
    and B [n, d_out] (gradients of the target w.r.t. the layer's outputs). The per-example
    gradient of the weight is B[i] ⊗ A[i] (shape [d_out, d_in]), of the bias B[i]."""

    weight: str | None      # parameter name of the trainable weight, or None if frozen
    bias: str | None        # parameter name of the trainable bias, or None
    A: torch.Tensor
    B: torch.Tensor


@dataclass
class FactoredGrads:
    layers: list[LayerFactors]
    layout: ParamLayout

    def __len__(self) -> int:
        return self.layers[0].B.shape[0]

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return self.layout.names

    def _find(self, name: str) -> tuple[LayerFactors, str]:
        for lf in self.layers:
            if lf.weight == name:
                return lf, "weight"
            if lf.bias == name:
                return lf, "bias"
        raise KeyError(name)

    def block(self, name: str) -> torch.Tensor:
        """[n, size of tensor `name`], materialised (row i = vec(B[i] ⊗ A[i]) for a weight)."""
        lf, kind = self._find(name)
        if kind == "bias":
            return lf.B
        A = _dense(lf.A)
        return (lf.B.unsqueeze(2) * A.unsqueeze(1)).flatten(1)

    def dense(self) -> torch.Tensor:
        """[n, n_params] in the layout's order."""
        return torch.cat([self.block(name) for name in self.layout.names], dim=1)


def as_sparse_if_sparse(A: torch.Tensor, max_density: float = 0.25) -> torch.Tensor:
    """A CSR copy of a 2-D tensor whose fraction of non-zeros is at most `max_density`
    (one-hot tabular inputs), else `A` itself."""
    if A.dim() != 2 or A.numel() == 0 or A.layout != torch.strided:
        return A
    if (A != 0).sum().item() <= max_density * A.numel():
        return to_csr(A)
    return A


def to_csr(A: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return A.to_sparse_csr()


def _dense(A: torch.Tensor) -> torch.Tensor:
    return A if A.layout == torch.strided else A.to_dense()


def linear_factors(model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: Target,
                   sparse_inputs: bool = False) -> FactoredGrads:
    """Factors of the per-example gradients of `target` for `x` [n, ...] in one batched
    forward/backward: the inputs of every trainable `nn.Linear` are recorded by forward
    hooks, the gradients of their outputs by tensor hooks. Exact because in eval mode
    example i's target depends only on example i's activations, so the gradient of the
    summed targets w.r.t. row i of an output is row i's own output gradient.

    `sparse_inputs`: store mostly-zero layer inputs (one-hot data) as CSR. Kernels and moments
    are dense GEMMs either way, so this only pays where the cost scales with the number of
    non-zeros (random projections); the TRAK projection sparsifies its own row blocks.

    Raises NotFactorable when the model has other trainable parameters, a linear layer is
    applied to more than one vector per example (sequences) or more than once per forward."""
    linears = factorable_linears(model)
    if not linears:
        raise NotFactorable("trainable parameters outside nn.Linear layers")
    layout = ParamLayout.of(model)
    model.eval()
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n, _ in linears}
    outputs: dict[str, list[torch.Tensor]] = {n: [] for n, _ in linears}
    handles = []

    def make_hook(name):
        def hook(mod, args, out):
            if args[0].dim() != 2:
                raise NotFactorable(f"linear layer {name!r} sees input of shape {tuple(args[0].shape)}, "
                                    f"not one vector per example")
            inputs[name].append(args[0].detach())
            outputs[name].append(out)
        return hook

    param_names = {id(p): n for n, p in model.named_parameters()}
    device = next(model.parameters()).device
    try:
        for name, mod in linears:
            handles.append(mod.register_forward_hook(make_hook(name)))
        with torch.enable_grad():
            out = model(x.to(device))
    finally:
        for h in handles:
            h.remove()
    for name, _ in linears:
        if len(inputs[name]) != 1:
            raise NotFactorable(f"linear layer {name!r} is applied {len(inputs[name])} times per forward")
    outs = [outputs[name][0] for name, _ in linears]
    grads = torch.autograd.grad(target(out, y.to(device)).sum(), outs, allow_unused=True)
    layers = []
    for (name, mod), gB, o in zip(linears, grads, outs):
        A = inputs[name][0]
        gB = torch.zeros_like(o) if gB is None else gB.detach()
        w = param_names[id(mod.weight)] if mod.weight.requires_grad else None
        b = param_names[id(mod.bias)] if mod.bias is not None and mod.bias.requires_grad else None
        layers.append(LayerFactors(weight=w, bias=b, A=as_sparse_if_sparse(A) if sparse_inputs else A,
                                   B=gB))
    return FactoredGrads(layers, layout)


# ----------------------------------------------------------------------------- kernels
def _gram(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """X Yᵀ for dense or sparse-CSR operands (sparse @ dense is what torch supports)."""
    if X.layout != torch.strided:
        return X @ _dense(Y).T
    if Y.layout != torch.strided:
        return (Y @ X.T).T
    return X @ Y.T


def tensor_kernels(gx: DenseGrads | FactoredGrads, gy: DenseGrads | FactoredGrads,
                   names: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """Per trainable tensor l: the kernel K_l[i, j] = ⟨g_{x_i,l}, g_{y_j,l}⟩, shape [nx, ny]."""
    names = names or gx.tensor_names
    if isinstance(gx, FactoredGrads) and isinstance(gy, FactoredGrads):
        out = {}
        for lx, ly in zip(gx.layers, gy.layers):
            bb = lx.B @ ly.B.T
            if lx.bias in names:
                out[lx.bias] = bb
            if lx.weight in names:
                out[lx.weight] = _gram(lx.A, ly.A) * bb
        return {n: out[n] for n in names}
    return {n: gx.block(n) @ gy.block(n).T for n in names}


def tensor_sq_norms(g: DenseGrads | FactoredGrads) -> dict[str, torch.Tensor]:
    """Per trainable tensor l: ‖g_{i,l}‖², shape [n]."""
    if isinstance(g, FactoredGrads):
        out = {}
        for lf in g.layers:
            b2 = lf.B.pow(2).sum(1)
            if lf.bias:
                out[lf.bias] = b2
            if lf.weight:
                out[lf.weight] = _dense(lf.A).pow(2).sum(1) * b2
        return {n: out[n] for n in g.tensor_names}
    return {n: g.block(n).pow(2).sum(1) for n in g.tensor_names}


def tensor_moments(g: DenseGrads | FactoredGrads) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per trainable tensor: Σ_i g_i and Σ_i g_i² (elementwise), each shaped like the flat
    tensor [size]. Factored: Σ_i b_i a_iᵀ = BᵀA and Σ_i (b_i a_iᵀ)² = (B²)ᵀ(A²)."""
    if isinstance(g, FactoredGrads):
        s1, s2 = {}, {}
        for lf in g.layers:
            if lf.bias:
                s1[lf.bias], s2[lf.bias] = lf.B.sum(0), lf.B.pow(2).sum(0)
            if lf.weight:
                A = _dense(lf.A)
                s1[lf.weight] = (lf.B.T @ A).flatten()
                s2[lf.weight] = (lf.B.pow(2).T @ A.pow(2)).flatten()
        return s1, s2
    return ({n: g.block(n).sum(0) for n in g.tensor_names}, {n: g.block(n).pow(2).sum(0) for n in g.tensor_names})


# ----------------------------------------------------------------------------- chunking
def chunk_rows(n_params: int, memory_budget_mb: float, bytes_per_value: int = 4, copies: int = 3,
               minimum: int = 1, maximum: int = 8192) -> int:
    """How many examples' gradients fit at once: `copies` full gradient vectors per example
    (vmap's intermediates, the flat copy, one product) within the budget."""
    per_row = max(n_params * bytes_per_value * copies, 1)
    rows = int(memory_budget_mb * 2**20 // per_row)
    if rows < minimum:
        raise MemoryError(f"one per-example gradient ({n_params:,} parameters) needs "
                          f"{per_row / 2**20:.1f} MB, more than attribution.memory_budget_mb={memory_budget_mb}; "
                          f"raise the budget or make fewer parameters trainable (model.trainable=head)")
    return min(rows, maximum)


def compute_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: Target,
                  factored: str | bool = "auto", chunk_size: int = 256) -> DenseGrads | FactoredGrads:
    """Per-example gradients of `target` for all of `x` at once, factored where possible
    (`factored`: "auto" | True | False)."""
    if factored in ("auto", True):
        try:
            return linear_factors(model, x, y, target)
        except NotFactorable:
            if factored is True:
                raise
    return DenseGrads(per_example_target_grads(model, x, y, target, chunk_size), ParamLayout.of(model))


def factored_row_bytes(model: nn.Module) -> int:
    """Bytes one example's factors take (inputs + output gradients of the trainable linears)."""
    linears = factorable_linears(model) or []
    return 4 * sum(m.in_features + m.out_features for _, m in linears) * 4


def iter_grad_chunks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: Target,
                     memory_budget_mb: float, factored: str | bool = "auto",
                     max_rows: int | None = None) -> Iterator[tuple[slice, DenseGrads | FactoredGrads]]:
    """Stream per-example gradients over `x` in chunks that fit `memory_budget_mb`:
    yields (rows, gradients of x[rows]). Factored chunks are bounded by their activations,
    dense ones by full gradient vectors."""
    layout = ParamLayout.of(model)
    use_factored = factored in ("auto", True) and factorable_linears(model)
    if factored is True and not use_factored:
        raise NotFactorable("trainable parameters outside nn.Linear layers; use factored=auto")
    if use_factored:
        rows = max(1, min(int(memory_budget_mb * 2**20 // max(factored_row_bytes(model), 1)), 16384))
    else:
        rows = chunk_rows(layout.n_params, memory_budget_mb)
    if max_rows:
        rows = min(rows, max_rows)
    for i in range(0, len(x), rows):
        sl = slice(i, min(i + rows, len(x)))
        yield sl, compute_grads(model, x[sl], y[sl], target, factored if use_factored else False,
                                chunk_size=min(rows, 256))

