"""Many copies of one model trained side by side: parameters with a leading run dimension.

Two implementations of the same interface (:class:`StackedModel`):
- :class:`FuncStacked`, for any `nn.Module`: `torch.func.functional_call` + `vmap(grad(...))`
  with `randomness="same"`, so every run of a step draws the same dropout mask (the draw a
  single model would make for that batch shape). Buffers (batch-norm running statistics)
  are stacked too, so each run keeps its own, as separate models would.
- :class:`MLPStacked`, for Linear/ReLU stacks (the paper's MLP, any `trainable` setting):
  batched matrix products with a hand-written backward, and, where the input rows are
  sparse (one-hot Folktables: 10 non-zeros of 791), a first layer that gathers and
  scatter-adds weight rows instead of multiplying by zeros. Equal to the dense computation
  up to rounding (tests/test_further_training_engine.py).

A training step receives, for a subset of runs, each run's own batch: `idx` [r, M] rows of
the training set and `w` [r, M] per-row loss weights (1/len(batch), 0 for masked rows, −ε
for a down-weighted row); the run's loss is Σ_m w[r, m] · loss(x[idx[r, m]]).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from tda.models.base import per_example_loss
from tda.models.structure import LinearOp, linear_relu_stack, should_use_sparse, sparse_rows


def _stack(t: torch.Tensor, R: int) -> torch.Tensor:
    """R contiguous copies of t: [R, *t.shape] (contiguous even when t is a transposed view)."""
    out = torch.empty((R, *t.shape), dtype=t.dtype, device=t.device)
    return out.copy_(t.detach().unsqueeze(0))


class StackedModel:
    """params: list of [R, ...] tensors (trainable parameters of every run)."""

    params: list[torch.Tensor]
    R: int

    def grads(self, rows: torch.Tensor | None, idx: torch.Tensor, w: torch.Tensor) -> list[torch.Tensor]:
        """Gradients of each selected run's weighted batch loss, [r, ...] per parameter.
        rows: which runs ([r] long, None = all R); idx [r, M] long; w [r, M]."""
        raise NotImplementedError

    def test_outputs(self, x_test: torch.Tensor) -> torch.Tensor:
        """[R, n_test, n_outputs] every run's outputs on the test instances in eval mode, on the CPU."""
        raise NotImplementedError

    def test_losses(self, x_test: torch.Tensor, y_test: torch.Tensor) -> torch.Tensor:
        """[R, n_test] per-test-instance losses of every run in eval mode, float64."""
        out = self.test_outputs(x_test)
        y = y_test.cpu()
        return torch.stack([per_example_loss(out[r], y, self.task) for r in range(self.R)]).double()

    def to(self, device: torch.device) -> "StackedModel":
        raise NotImplementedError


class FuncStacked(StackedModel):
    """Any module, through torch.func. Frozen parameters (requires_grad=False) are shared."""

    def __init__(self, module: nn.Module, R: int, x: torch.Tensor, y: torch.Tensor, task: str, eval_batch: int = 512,
                 vectorize: bool = True):
        """vectorize=False computes the runs' gradients one after another (same numbers, same
        dropout masks): on CPU, vmap turns convolutions into grouped convolutions, which are
        slower than a loop over runs."""
        self.vectorize = vectorize
        self.module = copy.deepcopy(module)
        self.R, self.x, self.y, self.task, self.eval_batch = R, x, y, task, eval_batch
        named = dict(self.module.named_parameters())
        self.names = [k for k, p in named.items() if p.requires_grad]
        if not self.names:
            raise ValueError("the model has no trainable parameters; check model.trainable")
        self.frozen = {k: p.detach() for k, p in named.items() if not p.requires_grad}
        self.params = [_stack(named[k], R) for k in self.names]
        self.buffer_names = [k for k, _ in self.module.named_buffers()]
        self.buffers = [_stack(b, R) for _, b in self.module.named_buffers()]

        def loss(p, b, xb, yb, wb):
            state = {**dict(zip(self.names, p)), **dict(zip(self.buffer_names, b)), **self.frozen}
            out = torch.func.functional_call(self.module, state, (xb,))
            return (per_example_loss(out, yb, task) * wb).sum()

        self._grad = torch.func.vmap(torch.func.grad(loss), in_dims=(0, 0, 0, 0, 0), randomness="same")
        self._grad_one = torch.func.grad(loss)

        def forward_eval(p, b, xb):
            state = {**dict(zip(self.names, p)), **dict(zip(self.buffer_names, b)), **self.frozen}
            return torch.func.functional_call(self.module, state, (xb,))

        self._eval = torch.func.vmap(forward_eval, in_dims=(0, 0, None))

    def to(self, device):
        self.module.to(device)
        self.x, self.y = self.x.to(device), self.y.to(device)
        self.frozen = {k: v.to(device) for k, v in self.frozen.items()}
        self.params = [p.to(device) for p in self.params]
        self.buffers = [b.to(device) for b in self.buffers]
        return self

    def grads(self, rows, idx, w):
        self.module.train()
        p = self.params if rows is None else [t[rows] for t in self.params]
        b = self.buffers if rows is None else [t[rows] for t in self.buffers]
        if self.vectorize:
            g = self._grad(p, b, self.x[idx], self.y[idx], w)
        else:
            # every run starts from the same generator state, so all draw the same dropout masks
            cpu_state = torch.get_rng_state()
            cuda = self.x.is_cuda
            cuda_state = torch.cuda.get_rng_state(self.x.device) if cuda else None
            per_run = []
            for r in range(len(idx)):
                torch.set_rng_state(cpu_state)
                if cuda:
                    torch.cuda.set_rng_state(cuda_state, self.x.device)
                b_r = [t[r] for t in b]  # views: batch-norm updates land in the stack
                per_run.append(self._grad_one([t[r] for t in p], b_r, self.x[idx[r]], self.y[idx[r]], w[r]))
            g = [torch.stack([gr[i] for gr in per_run]) for i in range(len(p))]
        if rows is not None:  # the selected runs' buffers were updated on copies
            for full, part in zip(self.buffers, b):
                full[rows] = part
        return list(g)

    @torch.no_grad()
    def test_outputs(self, x_test):
        self.module.eval()
        x_test = x_test.to(self.x.device)
        out = [self._eval(self.params, self.buffers, x_test[i:i + self.eval_batch])  # [R, b, ...]
               for i in range(0, len(x_test), self.eval_batch)]
        self.module.train()
        return torch.cat(out, dim=1).cpu()


# ------------------------------------------------------------------------------ MLP fast path
SCATTER_CHUNK_ELEMENTS = 1 << 20  # ~4 MB of float32 scatter source per chunk


class MLPStacked(StackedModel):
    """Linear/ReLU stacks with batched matmuls. Weights are stored transposed, [R, in, out]."""

    def __init__(self, module: nn.Module, R: int, x: torch.Tensor, y: torch.Tensor, task: str, sparse_input="auto"):
        stack = linear_relu_stack(module)
        if stack is None:
            raise ValueError(f"{type(module).__name__} is not a Linear/ReLU stack; use FuncStacked")
        self.R, self.task, self.ops = R, task, stack.ops
        # one [R, ...] tensor per parameter of the stack, in stack.names order (the ops index it), weights transposed
        named = dict(module.named_parameters())
        self.params = [_stack(named[k].t() if stack.is_weight(i) else named[k], R) for i, k in enumerate(stack.names)]
        self.x = x.reshape(len(x), -1)
        self.y = y
        self.sparse = should_use_sparse(self.x, sparse_input)
        if self.sparse:
            self.cols, self.vals = sparse_rows(self.x)

    def to(self, device):
        self.x, self.y = self.x.to(device), self.y.to(device)
        self.params = [p.to(device) for p in self.params]
        if self.sparse:
            self.cols, self.vals = self.cols.to(device), self.vals.to(device)
        return self

    def _scratch(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A tensor reused between steps (its contents are overwritten by the caller)."""
        if not hasattr(self, "_scratch_bufs"):
            self._scratch_bufs: dict[str, torch.Tensor] = {}
        t = self._scratch_bufs.get(name)
        if t is None or tuple(t.shape) != tuple(shape) or t.dtype != like.dtype or t.device != like.device:
            t = torch.empty(shape, dtype=like.dtype, device=like.device)
            self._scratch_bufs[name] = t
        return t

    def _ones(self, r: int, M: int, like: torch.Tensor) -> torch.Tensor:
        t = self._scratch("ones", (r, 1, M), like)
        return t.fill_(1)

    @staticmethod
    def _linear_params(params, op: LinearOp):
        """(Wᵀ [r, in, out], b [r, out] or None) of a linear op."""
        return params[op.weight], None if op.bias is None else params[op.bias]

    def _first_sparse(self, W, b, idx):
        r, M = idx.shape
        n_in, n_out = W.shape[1], W.shape[2]
        cols = self.cols[idx] + (torch.arange(r, device=idx.device) * n_in).view(r, 1, 1)  # [r, M, k]
        vals = self.vals[idx]
        z = F.embedding_bag(cols.view(r * M, -1), W.reshape(r * n_in, n_out), per_sample_weights=vals.view(r * M, -1),
                            mode="sum").view(r, M, n_out)
        return (z + b.unsqueeze(1) if b is not None else z), (cols, vals)

    def grads(self, rows, idx, w):
        P = self.params if rows is None else [t[rows] for t in self.params]
        r, M = idx.shape
        acts = []  # per op: its input
        h = None
        sparse_ctx = None
        for j, op in enumerate(self.ops):
            if isinstance(op, LinearOp):
                W, b = self._linear_params(P, op)
                if j == 0 and self.sparse:
                    acts.append(None)
                    h, sparse_ctx = self._first_sparse(W, b, idx)
                    continue
                if h is None:
                    h = self.x[idx]  # [r, M, in]
                acts.append(h)
                h = torch.baddbmm(b.unsqueeze(1), h, W) if b is not None else torch.bmm(h, W)
            else:
                acts.append(h)
                h = torch.relu(h)
        # d(Σ w·loss)/d(output)
        if self.task == "classification":
            dz = torch.softmax(h, dim=-1)
            dz.scatter_add_(-1, self.y[idx].unsqueeze(-1), -torch.ones_like(dz[..., :1]))
            dz = dz * w.unsqueeze(-1)
        else:
            yb = self.y[idx].to(h.dtype)
            dz = (2 * (h.reshape(yb.shape) - yb) * w).reshape(h.shape)
        grads: list[torch.Tensor | None] = [None] * len(P)
        for j in range(len(self.ops) - 1, -1, -1):
            op = self.ops[j]
            if not isinstance(op, LinearOp):  # ReLU
                dz = dz.masked_fill_(acts[j] <= 0, 0)  # dz is this step's own tensor
                continue
            W, b = self._linear_params(P, op)
            if b is not None:
                # Σ over the batch as a product with ones: a strided sum over the middle dimension
                # is several times slower than this GEMM
                ones = self._ones(r, M, dz)
                grads[op.bias] = torch.bmm(ones, dz).squeeze(1)
            if j == 0 and self.sparse:
                cols, vals = sparse_ctx
                n_in, n_out = W.shape[1], W.shape[2]
                # scatter-add each row's contributions vals·dz into the rows of W it used; the two
                # large tensors are reused between steps (a fresh multi-megabyte allocation is
                # returned to the OS when freed and page-faults again on every step)
                # (in chunks of runs that stay in cache: ~1.4x faster than one pass)
                g = self._scratch("dW1", (r * n_in, n_out), dz).zero_()
                chunk = max(1, SCATTER_CHUNK_ELEMENTS // (M * vals.shape[-1] * n_out))
                src = self._scratch("src", (min(chunk, r), M, vals.shape[-1], n_out), dz)
                for c0 in range(0, r, chunk):
                    c1 = min(r, c0 + chunk)
                    s = src[: c1 - c0]
                    torch.mul(vals[c0:c1].unsqueeze(-1), dz[c0:c1].unsqueeze(2), out=s)
                    g.index_add_(0, cols[c0:c1].reshape(-1), s.view(-1, n_out))
                grads[op.weight] = g.view(r, n_in, n_out)
                continue
            grads[op.weight] = torch.bmm(acts[j].transpose(1, 2), dz)
            if j > 0:
                dz = torch.bmm(dz, W.transpose(1, 2))
        return grads  # type: ignore[return-value]

    @torch.no_grad()
    def test_outputs(self, x_test):
        h = x_test.to(self.x.device).reshape(len(x_test), -1).to(self.params[0].dtype)
        for op in self.ops:
            if isinstance(op, LinearOp):
                W, b = self._linear_params(self.params, op)
                h = torch.matmul(h, W)  # [n, in] @ [R, in, out] or [R, n, in] @ [R, in, out]
                if b is not None:
                    h = h + b.unsqueeze(1)
            else:
                h = torch.relu(h)
        return h.cpu()  # [R, n_test, n_outputs]


def use_vmap(module: nn.Module, setting, device: torch.device | str = "cpu") -> bool:
    """`further_training.vmap`: true | false | auto (vmap, except convolutional models on CPU)."""
    if setting in (True, "true"):
        return True
    if setting in (False, "false"):
        return False
    has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())
    return not (has_conv and str(device).startswith("cpu"))


def build_stacked(module: nn.Module, R: int, x: torch.Tensor, y: torch.Tensor, task: str,
                  fast_path: bool = True, sparse_input="auto", vmap="auto", device=None) -> StackedModel:
    """The MLP fast path where it applies, torch.func otherwise."""
    if fast_path and linear_relu_stack(module) is not None:
        return MLPStacked(module, R, x, y, task, sparse_input=sparse_input)
    # the Trainer's accelerator names the device the runs will train on (Lightning's "auto" picks a GPU when
    # there is one)
    if device is None:
        device = x.device
    elif device in ("auto", "gpu"):
        device = "cuda" if device == "gpu" or torch.cuda.is_available() else "cpu"
    return FuncStacked(module, R, x, y, task, vectorize=use_vmap(module, vmap, device))
