"""Curvature products of Linear/ReLU stacks (the paper's MLP) written out by hand, for a block
of k vectors at once: the fast path of :class:`tda.methods.curvature.CurvatureOperator`.

The generic path vmaps `torch.func` transforms over the k columns. Here each layer's work is
one matrix product shared by all columns — the layer input a [m, d_in] times the k weight
directions side by side [d_in, k·d_out] — and a sparse input (one-hot Folktables: 10
non-zeros of 791) enters the first layer as a sparse matrix, so the layer that holds most of
the MLP's parameters costs its non-zeros instead of its width. Equal to the generic path up
to rounding (tests/test_methods_influence.py).

Products of the summed loss over the rows of a batch, along V = (dW_l, db_l) (Pearlmutter's
R-operator; ReLU's second derivative is zero):
    forward   Ra_0 = 0,  Rz_l = dW_l a_{l-1} + W_l Ra_{l-1} + db_l,  Ra_l = relu'(z_l) ⊙ Rz_l
    output    Rg_out = Λ Rz_L                    (Λ: the loss's Hessian in the output)
    backward  Rg_{z_l} = relu'(z_l) ⊙ Rg_{a_l},  Rg_{a_{l-1}} = W_lᵀ Rg_{z_l} [+ dW_lᵀ g_{z_l}]
    product   (C V)_{W_l} = Σ_rows Rg_{z_l} a_{l-1}ᵀ [+ g_{z_l} Ra_{l-1}ᵀ],  (C V)_{b_l} = Σ_rows Rg_{z_l}
The bracketed terms (g: the ordinary backpropagated gradient) are the true Hessian's; the
Gauss–Newton drops them.

Activations of the k columns are laid out [m, k, d], so that a product with a weight
matrix is one GEMM over m·k rows.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from tda.methods.output_hessian import apply_output_hessian, output_grad
from tda.models.structure import LinearOp, LinearReLUStack, linear_relu_stack, should_use_sparse


class MLPCurvature:
    """Block products of the Gauss–Newton or Hessian of a Linear/ReLU stack's summed loss.
    `slices[name]` places each parameter in the flat vector (:meth:`ParamLayout.slices`)."""

    def __init__(self, model: nn.Module, stack: LinearReLUStack, slices: dict[str, slice],
                 task: str, curvature: str, dtype: torch.dtype, device: torch.device):
        self.task, self.curvature, self.ops = task, curvature, stack.ops
        named = dict(model.named_parameters())
        # per parameter of the stack (indexed by the ops): the tensor, and its slice of the flat vector
        self.tensors = [named[k].detach().to(device, dtype) for k in stack.names]
        self.slices = [slices[k] for k in stack.names]
        self._states: dict = {}
        self._buffers: dict[str, torch.Tensor] = {}

    @classmethod
    def of(cls, model: nn.Module, slices: dict[str, slice], task: str, curvature: str,
           dtype: torch.dtype, device: torch.device) -> "MLPCurvature | None":
        """The fast path for `model`, or None where it does not apply (not a Linear/ReLU stack,
        tda.models.structure.linear_relu_stack)."""
        stack = linear_relu_stack(model)
        return None if stack is None else cls(model, stack, slices, task, curvature, dtype, device)

    def column_bytes(self, rows: int) -> int:
        """Memory one column of a product over `rows` rows holds: its tangent at every linear
        layer's output and the cotangents and their scratch (~3 such per layer), and its
        prepared directions, product and input (~4 parameter vectors)."""
        linears = [self.tensors[op.weight] for op in self.ops if isinstance(op, LinearOp)]
        return linears[0].element_size() * (3 * rows * sum(W.shape[0] for W in linears)
                                            + 4 * sum(W.numel() + W.shape[0] for W in linears))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        """What the products reuse: each linear layer's input (sparse for a sparse first
        layer, with its transpose), each ReLU's mask, the output and, for the Hessian,
        ∂loss/∂output."""
        x = x.reshape(len(x), -1)
        inputs, masks, h = [], [], x
        for op in self.ops:
            if isinstance(op, LinearOp):
                W = self.tensors[op.weight]
                inputs.append(h.to_sparse() if h is x and should_use_sparse(x, "auto") else h)
                h = inputs[-1] @ W.T if op.bias is None else torch.addmm(self.tensors[op.bias], inputs[-1], W.T)
            else:
                masks.append((h > 0).to(h.dtype))  # in the tangents' dtype: an in-place multiply, no cast
                h = torch.relu(h)
        g = output_grad(h, y, self.task) if self.curvature == "hessian" else None
        transposed = [a.t().coalesce() if a.is_sparse else a.T for a in inputs]
        return {"inputs": inputs, "inputs_t": transposed, "masks": masks, "out": h, "grad_out": g, "m": len(x)}

    def prepare(self, V: torch.Tensor, scratch: bool = False) -> list[torch.Tensor]:
        """V [n_params, k] as the forward pass multiplies it, per linear layer: the weight
        directions [d_in, k·d_out] (a permuted copy of V's [d_out, d_in, k] block). The same
        for every batch of a pass, so a full pass prepares it once. `scratch`: in this
        object's scratch space, valid until the next call with `scratch` (one product)."""
        k = V.shape[1]
        out = []
        for op in self.ops:
            if isinstance(op, LinearOp):
                W, ws, _ = self._linear(op)
                d_out, d_in = W.shape
                dest = (self._buffer(f"prepared{len(out)}", d_in, k, d_out, dtype=V.dtype, device=V.device) if scratch
                        else torch.empty(d_in, k, d_out, dtype=V.dtype, device=V.device))
                out.append(dest.copy_(V[ws].view(d_out, d_in, k).permute(1, 2, 0)).view(d_in, k * d_out))
        return out

    def batch_sum(self, x: torch.Tensor, y: torch.Tensor, V: torch.Tensor, key=None, out: torch.Tensor | None = None,
                  accumulate: bool = False, prepared: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Σ over the rows of x of the per-example curvature times V [n_params, k] -> [n_params, k],
        written into `out` (contiguous [n_params, k]; added to it with `accumulate`) if given,
        else into a new tensor. `key` names a batch that recurs (a full pass over the training
        set): its forward pass is kept and reused by later products; `prepared`: :meth:`prepare`
        of V."""
        V = V.contiguous()
        state = self._states.get(key) if key is not None else None
        if state is None:
            state = self.forward(x, y)
            if key is not None:
                self._states[key] = state
        if out is None:
            out, accumulate = torch.empty(V.shape, dtype=V.dtype, device=V.device), False
        self._product(state, V, out, prepared or self.prepare(V, scratch=True), accumulate)
        return out

    def _linear(self, op: LinearOp) -> tuple[torch.Tensor, slice, slice | None]:
        """W [out, in] of a linear op, and the slices of W and b (None: no bias) in the flat vector."""
        return self.tensors[op.weight], self.slices[op.weight], None if op.bias is None else self.slices[op.bias]

    def _buffer(self, role: str, *shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Scratch space of `shape` kept for the next product: a product's temporaries are a
        batch's activations times the columns (150 MB each for 3,000 rows × 100 columns of the
        MLP), and allocating that much afresh costs page faults comparable to the GEMM that
        fills it. `role` names one temporary; temporaries alive at the same time differ."""
        n = math.prod(shape)
        buf = self._buffers.get(role)
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != device:
            buf = self._buffers[role] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)

    def _product(self, state: dict, V: torch.Tensor, result: torch.Tensor, prepared: list[torch.Tensor],
                 accumulate: bool) -> None:
        """The batch's curvature times V into `result` (both [n_params, k]), added to it with
        `accumulate`, else replacing it."""
        k, m = V.shape[1], state["m"]
        inputs, inputs_t, masks, out = state["inputs"], state["inputs_t"], state["masks"], state["out"]
        hessian = self.curvature == "hessian"
        buf = functools.partial(self._buffer, dtype=V.dtype, device=V.device)
        # R-forward: tangents [m, k, d]; the input's tangent is zero
        tangents, t, li, ri = [], None, 0, 0
        for op in self.ops:
            if isinstance(op, LinearOp):
                W, ws, bs = self._linear(op)
                d_out, d_in = W.shape
                tangents.append(t)
                z = torch.mm(inputs[li], prepared[li], out=buf(f"z{li}", m, k * d_out))  # [m, k·d_out]
                if t is not None:
                    z.view(m * k, d_out).addmm_(t.view(m * k, d_in), W.T)
                z = z.view(m, k, d_out)
                if bs is not None:
                    z.add_(V[bs].T)
                t, li = z, li + 1
            else:
                t, ri = t.mul_(masks[ri].unsqueeze(1)), ri + 1  # (a pre-activation tangent is not kept)
        Rg = apply_output_hessian(out.unsqueeze(1), t, self.task)
        g = state["grad_out"]  # [m, d_out] for the Hessian, shared by the columns

        def write(dest, value):  # a block's first contribution
            return dest.add_(value) if accumulate else dest.copy_(value)

        # R-backward, writing each layer's block of the product
        for op in reversed(self.ops):
            if not isinstance(op, LinearOp):  # ReLU
                ri -= 1
                Rg.mul_(masks[ri].unsqueeze(1))
                g = g * masks[ri] if hessian else None
                continue
            W, ws, bs = self._linear(op)
            li -= 1
            d_out, d_in = W.shape
            block = result[ws].view(d_out, d_in, k)
            if inputs[li].is_sparse and m <= d_in:
                # a sparse input and few rows (LiSSA's mini-batches): turn the small Rg to
                # [m, d_out, k] first, so that Σ_rows a Rgᵀ comes out [d_in, d_out, k] and
                # reaches V's [d_out, d_in, k] layout by moving whole k-column rows
                Rt = buf("rg_t", m, d_out, k).copy_(Rg.transpose(1, 2))
                gW = torch.mm(inputs_t[li], Rt.view(m, d_out * k), out=buf("gw", d_in, d_out * k))
                write(block, gW.view(d_in, d_out, k).transpose(0, 1))
            else:
                # Σ_rows Rg_z a_inᵀ for every column: aᵀ [d_in, m] @ Rg [m, k·d_out]
                gW = torch.mm(inputs_t[li], Rg.view(m, k * d_out), out=buf("gw", d_in, k * d_out))
                # [d_in, k, d_out] -> [d_out, d_in, k] in two cache-friendly moves (one strided
                # permute is ~2.5x slower for the 791 × 128 first layer)
                gW = buf("gw_t", d_in, d_out, k).copy_(gW.view(d_in, k, d_out).transpose(1, 2))
                write(block, gW.transpose(0, 1))
            if hessian and tangents[li] is not None:
                block.add_((g.T @ tangents[li].view(m, k * d_in)).view(d_out, k, d_in).permute(0, 2, 1))
            if bs is not None:
                write(result[bs], Rg.sum(0).T)
            if li > 0:
                Rg_in = torch.mm(Rg.view(m * k, d_out), W, out=buf(f"rg{li % 2}", m * k, d_in)).view(m, k, d_in)
                if hessian:  # + g dW, added in Rg_in's [m, k, d_in] layout by the GEMM itself
                    dWt = buf("dw_t", d_out, k, d_in).copy_(V[ws].view(d_out, d_in, k).transpose(1, 2))
                    Rg_in.view(m, k * d_in).addmm_(g, dWt.view(d_out, k * d_in))
                    g = g @ W
                Rg = Rg_in
