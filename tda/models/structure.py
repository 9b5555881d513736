"""Model- and input-structure helpers shared by further training and the methods: a Linear/ReLU
stack as one op list (what every hand-written fast path runs) and one-hot / row-sparse inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tda.models.mlp import MLP


@dataclass(frozen=True)
class LinearOp:
    """z = h Wᵀ + b with W [out, in] and b [out]: `weight` and `bias` (None: no bias) are
    positions in :attr:`LinearReLUStack.names`."""

    weight: int
    bias: int | None


@dataclass(frozen=True)
class ReLUOp:
    """h = max(z, 0), elementwise."""


@dataclass(frozen=True)
class LinearReLUStack:
    """A Linear/ReLU stack as the op list the fast paths run: the Linear/ReLU engine of further
    training (tda.further_training.stacked), both fast paths of the derivative gold standard
    (tda.further_training.derivative_mlp, derivative_mlp_reverse) and the curvature products
    (tda.methods.mlp_curvature).

    `names`: the module's parameters in `named_parameters()` order (all trainable, each used by
    one layer), so a list of tensors in this order is indexed by the ops; `ops`: forward order,
    the first a :class:`LinearOp`. A leading Flatten is not an op: the paths take inputs as
    [n, features]."""

    names: tuple[str, ...]
    ops: tuple[LinearOp | ReLUOp, ...]

    @property
    def first(self) -> LinearOp:
        """The first layer (the one a row-sparse input meets)."""
        op = self.ops[0]
        if not isinstance(op, LinearOp):
            raise ValueError("a Linear/ReLU stack starts with a Linear layer")
        return op

    def is_weight(self, position: int) -> bool:
        """Whether parameter `position` is a layer's weight matrix (not a bias)."""
        return any(isinstance(op, LinearOp) and op.weight == position for op in self.ops)


def linear_relu_stack(module: nn.Module) -> LinearReLUStack | None:
    """`module` as a :class:`LinearReLUStack`, or None where the fast paths do not apply.

    Accepts nn.Linear, nn.Sequential and tda.models.mlp.MLP (whose forward is head(body(x)))
    built from Linear, ReLU, Identity, zero-probability Dropout and a leading Flatten, whose
    first layer is a Linear and whose every parameter is a trainable weight or bias of exactly
    one of its Linear layers (partially frozen stacks and shared layers take the generic paths)."""
    leaves: list[nn.Module] = []

    def walk(m: nn.Module) -> bool:
        if isinstance(m, MLP):
            return walk(m.body) and walk(m.head)
        if isinstance(m, nn.Sequential):
            return all(walk(c) for c in m)
        if isinstance(m, (nn.Linear, nn.ReLU, nn.Flatten)):
            leaves.append(m)
            return True
        return isinstance(m, nn.Identity) or (isinstance(m, nn.Dropout) and m.p == 0)

    if not walk(module):
        return None
    layers = leaves[1:] if leaves and isinstance(leaves[0], nn.Flatten) else leaves
    if not layers or not isinstance(layers[0], nn.Linear) or any(isinstance(m, nn.Flatten) for m in layers):
        return None
    named = list(module.named_parameters())
    if any(not p.requires_grad for _, p in named):
        return None  # partially frozen stacks take the generic path
    position = {id(p): i for i, (_, p) in enumerate(named)}
    ops: list[LinearOp | ReLUOp] = []
    for m in layers:
        if isinstance(m, nn.Linear):
            ops.append(LinearOp(position[id(m.weight)], None if m.bias is None else position[id(m.bias)]))
        else:
            ops.append(ReLUOp())
    used = [i for op in ops if isinstance(op, LinearOp) for i in (op.weight, op.bias) if i is not None]
    if sorted(used) != list(range(len(named))):
        return None  # a layer used twice, or parameters outside the layers
    return LinearReLUStack(tuple(k for k, _ in named), tuple(ops))


def sparse_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-sparse form of x [n, d]: cols [n, k] long, vals [n, k], k = most non-zeros in a row;
    shorter rows are padded with value 0 (which adds exactly nothing)."""
    nz = x != 0
    k = max(int(nz.sum(1).max()), 1) if len(x) else 1
    # stable sort puts each row's non-zero columns first, in column order
    order = torch.sort(nz.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :k]
    vals = torch.gather(x, 1, order)
    return order, vals


def should_use_sparse(x: torch.Tensor, setting) -> bool:
    if setting in (False, "false", "dense"):
        return False
    if x.dim() != 2 or not x.is_floating_point():
        if setting in (True, "true", "sparse"):
            raise ValueError("further_training.sparse_input=true needs 2-d floating-point inputs")
        return False
    if setting in (True, "true", "sparse"):
        return True
    k = int((x != 0).sum(1).max()) if len(x) else 0
    return k * 4 <= x.shape[1]  # gathering k rows beats a dense product by ~d/k
