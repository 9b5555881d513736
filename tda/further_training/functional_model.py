"""A model whose batch-norm layers are pure functions of their inputs and buffers, for the
derivative gold standard (tda.further_training.derivative).

torch's batch-norm kernel updates the running statistics in place, where ``torch.func``
transforms cannot see it; :func:`functional_model` swaps every batch-norm layer of a copy for
:class:`FunctionalBatchNorm`, the same arithmetic in plain tensor operations that reports its
train-mode batch statistics instead of storing them, so that the trajectory can carry the
running statistics (and their derivatives) as part of its state.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class FunctionalBatchNorm(nn.Module):
    """nn.BatchNorm{1,2,3}d in plain tensor operations; train-mode batch statistics are reported
    through `stash` (module, mean, unbiased variance) instead of updating the buffers in place."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, stash: list):
        super().__init__()
        self.eps, self.momentum, self.affine = bn.eps, bn.momentum, bn.affine
        self.track_running_stats = bn.track_running_stats
        self.weight, self.bias = bn.weight, bn.bias  # the same Parameters (names kept)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(name, getattr(bn, name, None))
        self.stash = stash
        self.training = bn.training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        if self.training or self.running_mean is None:
            mean = x.mean(dims)
            var = (x - mean.reshape(shape)).pow(2).mean(dims)
            if self.training and self.track_running_stats:
                count = x.numel() // x.shape[1]
                self.stash.append((self, mean, var * (count / max(count - 1, 1))))
        else:
            mean, var = self.running_mean, self.running_var
        out = (x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + self.eps)
        if self.affine:
            out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
        return out


def functional_model(model: nn.Module) -> tuple[nn.Module, list]:
    """A copy of `model` with every batch-norm layer replaced by :class:`FunctionalBatchNorm`
    (same parameter and buffer names), and the list its train-mode statistics are reported in."""
    model = copy.deepcopy(model)
    stash: list = []

    def swap(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(parent, name, FunctionalBatchNorm(child, stash))
            else:
                swap(child)

    if isinstance(model, nn.modules.batchnorm._BatchNorm):
        raise ValueError("a bare batch-norm layer is not a model")
    swap(model)
    return model, stash
