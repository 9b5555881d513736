"""Curvature of the mean training loss at the final model, as matrix-free products, and the
damping rule shared by every influence-function method (SPEC §3).

All vectors live in the flat parameter space of the trainable model: the concatenation of
its trainable parameters in `named_parameters` order, the same layout as
:func:`tda.methods.gradients.per_example_grads`. Blocks of vectors are [n_params, k].

- `hessian`: H V with H = ∇²(1/n Σᵢ loss(zᵢ, θ)), reverse over reverse (a VJP of `grad`),
  vmapped over the k columns.
- `gn`: the Gauss–Newton G V = 1/n Σᵢ Jᵢᵀ Λᵢ Jᵢ V with Jᵢ the Jacobian of the model output
  and Λᵢ the Hessian of the loss in the output: a JVP, the closed-form Λᵢ, then a VJP.

Linear/ReLU stacks (the paper's MLP) take a hand-written path for both,
:mod:`tda.methods.mlp_curvature` (one GEMM per layer for all k columns, a sparse first layer
for one-hot rows; 2.3–4.4× faster, `benchmarks/methods_influence.py --products`);
`fast_path=False` forces the `torch.func` path, which the tests compare it against.

The model is used in eval mode (batch norm with running statistics, dropout off): the
function being differentiated is the final model's, as attribution requires.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from tda.artifacts import load_json, save_json
from tda.memory import activation_numel
from tda.models.base import per_example_loss

log = logging.getLogger(__name__)

CURVATURES = ("gn", "hessian")


class ParamSpace:
    """Converts between the flat parameter vector [n_params] and the dict of trainable
    parameters that `functional_call` takes."""

    def __init__(self, model: nn.Module):
        self.names = [k for k, v in model.named_parameters() if v.requires_grad]
        params = dict(model.named_parameters())
        self.shapes = [params[k].shape for k in self.names]
        self.sizes = [params[k].numel() for k in self.names]
        self.n_params = sum(self.sizes)
        if self.n_params == 0:
            raise ValueError("the model has no trainable parameters; check model.trainable")
        self.frozen = {k: v.detach() for k, v in model.named_parameters() if not v.requires_grad}
        self.buffers = {k: v.detach() for k, v in model.named_buffers()}
        self.params = {k: params[k].detach() for k in self.names}

    def flat(self, tensors: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        tensors = self.params if tensors is None else tensors
        return torch.cat([tensors[k].reshape(-1) for k in self.names])

    def unflat(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """[n_params] -> dict of parameter-shaped views."""
        return {k: t.view(s) for k, t, s in zip(self.names, v.split(self.sizes), self.shapes)}

    def offsets(self) -> dict[str, tuple[int, int]]:
        out, start = {}, 0
        for k, s in zip(self.names, self.sizes):
            out[k] = (start, start + s)
            start += s
        return out


def output_hessian_sqrt(out: torch.Tensor, task: str) -> torch.Tensor:
    """Columns u_c with Σ_c u_c u_cᵀ = Λ, the Hessian of the loss in the model output.
    out [b, C] -> [b, C, C] (index 1: the column c). Cross-entropy: Λ = diag(p) − ppᵀ and
    u_c = √p_c (e_c − p); squared error on [b, 1] / [b]: Λ = 2."""
    if task == "classification":
        p = torch.softmax(out, dim=-1)
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


class CurvatureOperator:
    """V [n_params, k] -> C V [n_params, k] for C the Hessian or Gauss–Newton of the mean
    loss over rows (`matvec`: the whole training set, in batches of `batch_size`;
    `batch_matvec`: the mean over the given rows only, as LiSSA's mini-batches need)."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str, curvature: str = "gn",
                 batch_size: int = 1024, dtype: torch.dtype | None = None, device: torch.device | None = None,
                 memory_budget_mb: float | None = None, fast_path: bool = True):
        if curvature not in CURVATURES:
            raise ValueError(f"curvature={curvature!r} is not one of {CURVATURES}")
        model.eval()
        self.model, self.task, self.curvature = model, task, curvature
        self.space = ParamSpace(model)
        self.device = device or next(iter(self.space.params.values())).device
        self.dtype = dtype or next(iter(self.space.params.values())).dtype
        cast = lambda d: {k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
                          for k, v in d.items()}
        self.params = cast(self.space.params)
        self.const = {**cast(self.space.frozen), **cast(self.space.buffers)}
        self.x, self.y = x, y
        self.batch_size = int(batch_size)
        from tda.methods.mlp_curvature import MLPCurvature  # noqa: PLC0415 (it imports this module)

        # Linear/ReLU stacks: hand-written block products, one GEMM per layer for all columns
        self.fast = MLPCurvature.of(model, self.space.offsets(), task, curvature, self.dtype,
                                    self.device) if fast_path else None
        self.n_matvecs = 0  # columns × passes over the whole set, for the record
        # columns multiplied at once: each holds a batch's activations (tangents and cotangents,
        # ~4 copies) and a product vector; a block of 100 columns over 1,024 images of a
        # ResNet-9 would need ~100 GB
        self.max_columns = None
        if memory_budget_mb is not None:
            nbytes = torch.finfo(self.dtype).bits // 8
            act = activation_numel(model, x[:1])
            per_column = self.batch_size * act * nbytes * 4 + self.space.n_params * nbytes * 2
            self.max_columns = max(1, int(memory_budget_mb * 2**20 // per_column))

    @property
    def n_params(self) -> int:
        return self.space.n_params

    def _fwd(self, p: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, (p, self.const), (x,))

    def _prep(self, x, y):
        x = x.to(self.device)
        x = x.to(self.dtype) if x.is_floating_point() else x
        y = y.to(self.device)
        y = y.to(self.dtype) if y.is_floating_point() else y
        return x, y

    def _batch_sum(self, x: torch.Tensor, y: torch.Tensor, V: torch.Tensor, key: int | None = None) -> torch.Tensor:
        """Σ over the rows of the per-example curvature times V: [n_params, k]. `key`: the
        batch's start row in a full pass (the fast path keeps its forward pass)."""
        x, y = self._prep(x, y)
        step = self.max_columns or V.shape[1]
        if self.fast is not None:
            parts = [self.fast.batch_sum(x, y, V[:, c:c + step], key) for c in range(0, V.shape[1], step)]
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        if self.curvature == "hessian":
            def loss_sum(p):
                return per_example_loss(self._fwd(p, x), y, self.task).sum()

            # reverse over reverse: the gradient's graph is built once per batch and every
            # column is one backward pass through it (H is symmetric, so tᵀH = (Ht)ᵀ); for one
            # column on CPU faster than forward over reverse (methods_influence.py --products)
            _, vjp_grad = vjp(grad(loss_sum), self.params)

            def product(t):
                return vjp_grad(t)[0]
        else:
            def f(p):
                return self._fwd(p, x)

            o, vjp_fn = vjp(f, self.params)

            def product(t):
                jv = jvp(f, (self.params,), (t,))[1]
                return vjp_fn(apply_output_hessian(o, jv, self.task))[0]

        parts = []
        for c in range(0, V.shape[1], step):
            W = V[:, c:c + step]
            if W.shape[1] == 1:  # one column (Arnoldi, LiSSA per step): vmap's batching costs more than it saves
                out = {k: v.unsqueeze(0) for k, v in product(self.space.unflat(W[:, 0])).items()}
            else:
                out = vmap(product)(vmap(self.space.unflat, in_dims=1)(W))  # dict of [k, *shape]
            parts.append(torch.cat([out[k].reshape(W.shape[1], -1) for k in self.space.names], dim=1).T)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def batch_matvec(self, idx: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """Mean over the rows `idx` of the per-example curvature, times V [n_params, k]."""
        return self._batch_sum(self.x[idx], self.y[idx], V) / len(idx)

    def matvec(self, V: torch.Tensor) -> torch.Tensor:
        """Curvature of the mean loss over all rows, times V [n_params, k]."""
        squeeze = V.dim() == 1
        V = V.reshape(len(V), -1).to(self.device, self.dtype)
        out = None
        n = len(self.x)
        for i in range(0, n, self.batch_size):
            part = self._batch_sum(self.x[i:i + self.batch_size], self.y[i:i + self.batch_size], V, key=i)
            out = part if out is None else out.add_(part)
        self.n_matvecs += V.shape[1]
        out.div_(n)
        return out.squeeze(1) if squeeze else out

    def per_example_matvec(self, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Each row's own curvature times one vector v [n_params]: [n_rows, n_params]."""
        v = v.to(self.device, self.dtype)
        t = self.space.unflat(v)
        x, y = self._prep(x, y)

        def one(xi, yi):
            xi, yi = xi.unsqueeze(0), yi.unsqueeze(0)
            if self.curvature == "hessian":
                def loss(p):
                    return per_example_loss(self._fwd(p, xi), yi, self.task).sum()
                r = jvp(grad(loss), (self.params,), (t,))[1]
            else:
                def f(p):
                    return self._fwd(p, xi)
                o, vjp_fn = vjp(f, self.params)
                jv = jvp(f, (self.params,), (t,))[1]
                r = vjp_fn(apply_output_hessian(o, jv, self.task))[0]
            return torch.cat([r[k].reshape(-1) for k in self.space.names])

        return torch.cat([vmap(one)(x[i:i + 64], y[i:i + 64]) for i in range(0, len(x), 64)])

    def dense(self) -> torch.Tensor:
        """The explicit [n_params, n_params] matrix (tests and tiny models only)."""
        if self.n_params > 5000:
            raise ValueError(f"refusing to form a dense {self.n_params}² curvature matrix")
        return self.matvec(torch.eye(self.n_params, dtype=self.dtype, device=self.device))


def flat_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str, chunk_size: int = 256,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-example gradients [n, n_params] (per_example_grads), optionally cast."""
    from tda.methods.gradients import per_example_grads

    g = per_example_grads(model, x, y, task, chunk_size)
    return g if dtype is None else g.to(dtype)


def mean_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str, batch_size: int = 1024,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """∇ of the mean loss over the rows, [n_params] (plain backprop in batches)."""
    op = CurvatureOperator(model, x, y, task, "gn", batch_size, dtype)
    total = torch.zeros(op.n_params, dtype=op.dtype, device=op.device)

    def loss_sum(p, xb, yb):
        return per_example_loss(op._fwd(p, xb), yb, task).sum()

    for i in range(0, len(x), batch_size):
        xb, yb = op._prep(x[i:i + batch_size], y[i:i + batch_size])
        g = grad(loss_sum)(op.params, xb, yb)
        total += torch.cat([g[k].reshape(-1) for k in op.space.names])
    return total / len(x)


# ------------------------------------------------------------------------------------ damping
def model_fingerprint(model: nn.Module, *tensors: torch.Tensor) -> str:
    """A hash of the trainable parameters' values and the given data, for cache keys."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def base_damping(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str, chunk_size: int = 256,
                 cache_dir: Path | None = None, memory_budget_mb: float = 256.0) -> float:
    """λ₀ = the mean of the squared entries of the per-example training gradients (SPEC §3,
    Grosse et al.) = Σᵢ‖gᵢ‖² / (n · n_params). Only the squared norms are needed, so linear
    layers give them from their factors (‖b aᵀ‖² = ‖a‖²‖b‖²) without forming any gradient;
    other models stream dense chunks of at most `chunk_size` rows. Cached as JSON in
    `cache_dir` keyed by model and data."""
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"lambda0-{model_fingerprint(model, x, y)}.json"
        if path.is_file():
            return float(load_json(path)["lambda0"])
    from tda.methods.gradients import ParamLayout, iter_grad_chunks, loss_target, tensor_sq_norms

    total = 0.0
    for _, g in iter_grad_chunks(model, x, y, loss_target(task), memory_budget_mb, max_rows=chunk_size):
        total += float(sum(v.double().sum() for v in tensor_sq_norms(g).values()))
    lam0 = total / (len(x) * ParamLayout.of(model).n_params)
    if not lam0 > 0:
        raise ValueError("λ₀ (mean squared per-example gradient entry) is 0: every training loss is flat; "
                         "set damping explicitly with method.damping_multiple and a non-degenerate model")
    if path is not None:
        save_json(path, {"lambda0": lam0, "n_rows": len(x)})
    return lam0


def resolve_damping(multiple: float, lam0: float, record: dict) -> float:
    lam = float(multiple) * lam0
    if not lam >= 0:
        raise ValueError(f"method.damping_multiple={multiple} gives λ={lam}; use a value ≥ 0")
    record.update({"lambda0": lam0, "damping_multiple": float(multiple), "damping": lam})
    return lam


DTYPES = {"float32": torch.float32, "float64": torch.float64, None: None}


def resolve_dtype(name: str | None) -> torch.dtype | None:
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r} is not one of float32, float64, null (the model's own)")
    return DTYPES[name]


class InfluenceMethod:
    """Shared plumbing of the IF methods: test and left-out gradients, λ, and the score
    g_testᵀ (C + λI)⁻¹ g_j / n. Subclasses implement `inverse_apply`."""

    def _setup(self, problem, dtype_name: str | None, chunk_size: int, damping_multiple: float):
        model = problem.model.to(problem.device)
        model.eval()
        dtype = resolve_dtype(dtype_name) or next(model.parameters()).dtype
        g_test = flat_grads(model, problem.x_test, problem.y_test, problem.task, chunk_size, dtype)
        g_lo = flat_grads(model, problem.x_left_out, problem.y_left_out, problem.task, chunk_size, dtype)
        return model, dtype, g_test, g_lo, self._damping(problem, model, chunk_size, damping_multiple)

    def _damping(self, problem, model: nn.Module, chunk_size: int, damping_multiple: float) -> float:
        """λ = damping_multiple × λ₀ (both recorded)."""
        lam0 = base_damping(model, problem.x_train, problem.y_train, problem.task, chunk_size, problem.cache_dir)
        return resolve_damping(damping_multiple, lam0, self.record)

    def _operator(self, problem, model: nn.Module, dtype: torch.dtype) -> "CurvatureOperator":
        """The method's curvature (`self.curvature`, batches of `self.batch_size` training rows)
        of the mean training loss, its column blocks bounded by the memory budget."""
        return CurvatureOperator(model, problem.x_train, problem.y_train, problem.task, self.curvature,
                                 self.batch_size, dtype, problem.device, problem.memory_budget_mb)

    @staticmethod
    def solve_side(g_test: torch.Tensor, g_lo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(rows to solve for, rows to dot with, transposed?): (C+λI)⁻¹ is symmetric, so the
        smaller side is solved and the other one dotted."""
        if len(g_lo) < len(g_test):
            return g_lo, g_test, True
        return g_test, g_lo, False


def scores_from_solution(X: torch.Tensor, other: torch.Tensor, n: int, transposed: bool) -> torch.Tensor:
    """X [n_params, k] = (C+λI)⁻¹ of the solved rows; other [m, n_params] -> [n_test, n_left_out]."""
    s = (other @ X).T / n  # [k, m]
    return (s.T if transposed else s).contiguous()


Matvec = Callable[[torch.Tensor], torch.Tensor]
