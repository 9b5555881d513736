"""Curvature of the mean training loss at the final model, as matrix-free products (docs/method.md §3.2).

All vectors live in the flat parameter space of :mod:`tda.methods.layout`; blocks of vectors
are [n_params, k].

- `hessian`: H V with H = ∇²(1/n Σᵢ loss(zᵢ, θ)), reverse over reverse (a VJP of `grad`),
  vmapped over the k columns.
- `gn`: the Gauss–Newton G V = 1/n Σᵢ Jᵢᵀ Λᵢ Jᵢ V with Jᵢ the Jacobian of the model output
  and Λᵢ the Hessian of the loss in the output (:mod:`tda.methods.output_hessian`): a JVP,
  the closed-form Λᵢ, then a VJP.

Linear/ReLU stacks (the paper's MLP) take a hand-written path for both,
:mod:`tda.methods.mlp_curvature` (one GEMM per layer for all k columns, a sparse first layer
for one-hot rows; 2.3–4.4× faster, `benchmarks/methods_influence.py --products`);
`fast_path=False` forces the `torch.func` path, which the tests compare it against.

The model is used in eval mode (batch norm with running statistics, dropout off): the
function being differentiated is the final model's, as attribution requires.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from tda.memory import activation_numel
from tda.methods.layout import ParamLayout, frozen_state, trainable_params
from tda.methods.mlp_curvature import MLPCurvature
from tda.methods.output_hessian import apply_output_hessian
from tda.models.base import per_example_loss

CURVATURES = ("gn", "hessian")

Matvec = Callable[[torch.Tensor], torch.Tensor]
"""A symmetric operator on blocks of the flat parameter space: [n_params, k] -> [n_params, k]."""


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
        self.layout = ParamLayout.of(model)
        trainable = trainable_params(model)
        self.device = device or next(iter(trainable.values())).device
        self.dtype = dtype or next(iter(trainable.values())).dtype

        def cast(d):
            return {k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
                    for k, v in d.items()}

        self.params = cast(trainable)
        self.const = cast(frozen_state(model))
        self.x, self.y = x, y
        self.batch_size = int(batch_size)
        # Linear/ReLU stacks: hand-written block products, one GEMM per layer for all columns
        self.fast = MLPCurvature.of(model, self.layout.slices(), task, curvature, self.dtype,
                                    self.device) if fast_path else None
        self.n_matvecs = 0  # columns × passes over the whole set, for the record
        # columns multiplied at once: each holds a batch's activations (tangents and cotangents,
        # ~4 copies) and a product vector; a block of 100 columns over 1,024 images of a
        # ResNet-9 would need ~100 GB
        self.max_columns = None
        if memory_budget_mb is not None:
            nbytes = torch.finfo(self.dtype).bits // 8
            if self.fast is not None:
                per_column = self.fast.column_bytes(min(self.batch_size, len(x)))
            else:
                act = activation_numel(model, x[:1])
                per_column = self.batch_size * act * nbytes * 4 + self.layout.n_params * nbytes * 2
            self.max_columns = max(1, int(memory_budget_mb * 2**20 // per_column))

    @property
    def n_params(self) -> int:
        return self.layout.n_params

    def _fwd(self, p: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, (p, self.const), (x,))

    def _prep(self, x, y):
        x = x.to(self.device)
        x = x.to(self.dtype) if x.is_floating_point() else x
        y = y.to(self.device)
        y = y.to(self.dtype) if y.is_floating_point() else y
        return x, y

    def _batch_sum(self, x: torch.Tensor, y: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """Σ over the rows of the per-example curvature times V: [n_params, k] (the generic path)."""
        x, y = self._prep(x, y)
        step = self.max_columns or V.shape[1]
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
                out = {k: v.unsqueeze(0) for k, v in product(self.layout.unflatten(W[:, 0])).items()}
            else:
                out = vmap(product)(vmap(self.layout.unflatten, in_dims=1)(W))  # dict of [k, *shape]
            parts.append(torch.cat([out[k].reshape(W.shape[1], -1) for k in self.layout.names], dim=1).T)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _chunks(self, k: int) -> list[slice]:
        """The column chunks a block of k columns is multiplied in (`max_columns` at a time)."""
        step = self.max_columns or k
        return [slice(c, min(c + step, k)) for c in range(0, k, step)]

    def batch_matvec(self, idx: torch.Tensor, V: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Mean over the rows `idx` of the per-example curvature, times V [n_params, k]; written
        into `out` ([n_params, k], contiguous) if given (the fast path then allocates nothing of
        V's size: LiSSA calls this once per step)."""
        if self.fast is None:
            r = self._batch_sum(self.x[idx], self.y[idx], V).div_(len(idx))
            return r if out is None else out.copy_(r)
        x, y = self._prep(self.x[idx], self.y[idx])
        V = V.to(self.device, self.dtype)
        if out is None:
            out = torch.empty(V.shape, dtype=self.dtype, device=self.device)
        chunks = self._chunks(V.shape[1])
        if len(chunks) == 1:
            self.fast.batch_sum(x, y, V, out=out)
        else:
            for c in chunks:
                out[:, c] = self.fast.batch_sum(x, y, V[:, c])
        return out.div_(len(idx))

    def matvec(self, V: torch.Tensor) -> torch.Tensor:
        """Curvature of the mean loss over all rows, times V [n_params, k]."""
        squeeze = V.dim() == 1
        V = V.reshape(len(V), -1).to(self.device, self.dtype)
        n = len(self.x)
        batches = range(0, n, self.batch_size)
        if self.fast is not None:
            # each column chunk accumulates every batch's product in one buffer, its weight
            # directions prepared once for all batches
            chunks = [V[:, c].contiguous() for c in self._chunks(V.shape[1])]
            prepared = [self.fast.prepare(W) for W in chunks]
            sums = [torch.empty(W.shape, dtype=self.dtype, device=self.device) for W in chunks]
            for i in batches:
                x, y = self._prep(self.x[i:i + self.batch_size], self.y[i:i + self.batch_size])
                for W, p, s in zip(chunks, prepared, sums):
                    self.fast.batch_sum(x, y, W, key=i, out=s, accumulate=i > 0, prepared=p)
            out = sums[0] if len(sums) == 1 else torch.cat(sums, dim=1)
        else:
            out = None
            for i in batches:
                part = self._batch_sum(self.x[i:i + self.batch_size], self.y[i:i + self.batch_size], V)
                out = part if out is None else out.add_(part)
        self.n_matvecs += V.shape[1]
        out.div_(n)
        return out.squeeze(1) if squeeze else out

    def per_example_matvec(self, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Each row's own curvature times one vector v [n_params]: [n_rows, n_params]."""
        v = v.to(self.device, self.dtype)
        t = self.layout.unflatten(v)
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
            return torch.cat([r[k].reshape(-1) for k in self.layout.names])

        return torch.cat([vmap(one)(x[i:i + 64], y[i:i + 64]) for i in range(0, len(x), 64)])

    def dense(self) -> torch.Tensor:
        """The explicit [n_params, n_params] matrix (tests and tiny models only)."""
        if self.n_params > 5000:
            raise ValueError(f"refusing to form a dense {self.n_params}² curvature matrix")
        return self.matvec(torch.eye(self.n_params, dtype=self.dtype, device=self.device))


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
        total += op.layout.flatten(g)
    return total / len(x)
