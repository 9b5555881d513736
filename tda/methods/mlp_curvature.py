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

    @classmethod
    def of(cls, model: nn.Module, slices: dict[str, slice], task: str, curvature: str,
           dtype: torch.dtype, device: torch.device) -> "MLPCurvature | None":
        """The fast path for `model`, or None where it does not apply (not a Linear/ReLU stack,
        tda.models.structure.linear_relu_stack)."""
        stack = linear_relu_stack(model)
        return None if stack is None else cls(model, stack, slices, task, curvature, dtype, device)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        """What the products reuse: each linear layer's input (sparse for a sparse first
        layer), each ReLU's mask, the output and, for the Hessian, ∂loss/∂output."""
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
        return {"inputs": inputs, "masks": masks, "out": h, "grad_out": g, "m": len(x)}

    def batch_sum(self, x: torch.Tensor, y: torch.Tensor, V: torch.Tensor, key=None) -> torch.Tensor:
        """Σ over the rows of x of the per-example curvature times V [n_params, k] -> [n_params, k].
        `key` names a batch that recurs (a full pass over the training set): its forward pass
        is kept and reused by later products."""
        state = self._states.get(key) if key is not None else None
        if state is None:
            state = self.forward(x, y)
            if key is not None:
                self._states[key] = state
        return self._product(state, V)

    def _linear(self, op: LinearOp) -> tuple[torch.Tensor, slice, slice | None]:
        """W [out, in] of a linear op, and the slices of W and b (None: no bias) in the flat vector."""
        return self.tensors[op.weight], self.slices[op.weight], None if op.bias is None else self.slices[op.bias]

    def _product(self, state: dict, V: torch.Tensor) -> torch.Tensor:
        k, m = V.shape[1], state["m"]
        inputs, masks, out = state["inputs"], state["masks"], state["out"]
        hessian = self.curvature == "hessian"
        # R-forward: tangents [m, k, d]; the input's tangent is zero
        tangents, t, li, ri = [], None, 0, 0
        for op in self.ops:
            if isinstance(op, LinearOp):
                W, ws, bs = self._linear(op)
                d_out, d_in = W.shape
                tangents.append(t)
                dW = V[ws].reshape(d_out, d_in, k)
                z = inputs[li] @ dW.permute(1, 2, 0).reshape(d_in, k * d_out)  # [m, k·d_out]
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
        # R-backward, writing each layer's block of the product
        result = torch.empty(V.shape, dtype=V.dtype, device=V.device)
        for op in reversed(self.ops):
            if not isinstance(op, LinearOp):  # ReLU
                ri -= 1
                Rg.mul_(masks[ri].unsqueeze(1))
                g = g * masks[ri] if hessian else None
                continue
            W, ws, bs = self._linear(op)
            li -= 1
            d_out, d_in = W.shape
            # Σ_rows Rg_z a_inᵀ for every column: aᵀ [d_in, m] @ Rg [m, k·d_out]
            gW = (inputs[li].T @ Rg.view(m, k * d_out)).view(d_in, k, d_out).permute(2, 0, 1)
            if hessian and tangents[li] is not None:
                gW = gW + (g.T @ tangents[li].view(m, k * d_in)).view(d_out, k, d_in).permute(0, 2, 1)
            result[ws].view(d_out, d_in, k).copy_(gW)
            if bs is not None:
                result[bs] = Rg.sum(0).T
            if li > 0:
                Rg_in = (Rg.view(m * k, d_out) @ W).view(m, k, d_in)
                if hessian:
                    dW = V[ws].reshape(d_out, d_in * k)
                    Rg_in.add_((g @ dW).view(m, d_in, k).transpose(1, 2))
                    g = g @ W
                Rg = Rg_in
        return result
