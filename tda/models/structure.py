"""Model- and input-structure helpers shared by further training and the methods: recognising a
Linear/ReLU stack (the fast paths) and one-hot / row-sparse inputs."""

from __future__ import annotations

import torch
from torch import nn

from tda.models.mlp import MLP


def mlp_layers(module: nn.Module) -> list[nn.Module] | None:
    """The leaf modules of a Linear/ReLU stack in forward order, or None if `module` is not one.

    Accepts nn.Linear, nn.Sequential and tda.models.mlp.MLP (whose forward is head(body(x)))
    built from Linear, ReLU, Identity, zero-probability Dropout and a leading Flatten."""
    out: list[nn.Module] = []

    def walk(m: nn.Module) -> bool:
        if isinstance(m, MLP):
            return walk(m.body) and walk(m.head)
        if isinstance(m, nn.Sequential):
            return all(walk(c) for c in m)
        if isinstance(m, (nn.Linear, nn.ReLU, nn.Flatten)):
            out.append(m)
            return True
        if isinstance(m, nn.Identity) or (isinstance(m, nn.Dropout) and m.p == 0):
            return True
        return False

    if not walk(module):
        return None
    if any(isinstance(m, nn.Flatten) for m in out[1:]) or not any(isinstance(m, nn.Linear) for m in out):
        return None
    if any(not p.requires_grad for p in module.parameters()):
        return None  # partially frozen stacks take the generic path
    return out


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
