"""Per-example gradients of the trainable model with torch.func, in chunks.

The model is evaluated in eval mode (dropout off, batch norm with running statistics), as
attribution at the final model requires.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from tda.models.base import per_example_loss


def trainable_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}


def per_example_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str,
                      chunk_size: int = 256) -> torch.Tensor:
    """Flattened per-example loss gradients, shape [n, n_params] (trainable parameters,
    in `named_parameters` order)."""
    model.eval()
    params = trainable_params(model)
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    frozen = {k: v.detach() for k, v in model.named_parameters() if not v.requires_grad}

    def loss_one(p, xi, yi):
        out = functional_call(model, (p, frozen, buffers), (xi.unsqueeze(0),))
        return per_example_loss(out, yi.unsqueeze(0), task).squeeze(0)

    g = vmap(grad(loss_one), in_dims=(None, 0, 0))
    device = next(iter(params.values())).device
    rows = []
    for i in range(0, len(x), chunk_size):
        gi = g(params, x[i:i + chunk_size].to(device), y[i:i + chunk_size].to(device))
        rows.append(torch.cat([gi[k].flatten(1) for k in params], dim=1))
    return torch.cat(rows)
