"""The flat parameter space every method works in.

A vector of the parameter space is the concatenation of the model's trainable parameters in
`named_parameters` order, flattened: [n_params]. Per-example gradients are rows of it
([n, n_params]), curvature products take and return columns of it ([n_params, k]).
:class:`ParamLayout` converts between such a vector and the dict of parameter-shaped tensors
that `torch.func.functional_call` takes; :func:`trainable_params` and :func:`frozen_state`
split a model's state into the part that is differentiated and the part held fixed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tda.exits import RefusedError


def trainable_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters (requires_grad), detached, in `named_parameters` order."""
    return {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}


def frozen_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything `functional_call` needs besides the trainable parameters: the frozen
    parameters and the buffers (batch-norm statistics), detached."""
    frozen = {k: v.detach() for k, v in model.named_parameters() if not v.requires_grad}
    return {**frozen, **{k: v.detach() for k, v in model.named_buffers()}}


@dataclass(frozen=True)
class ParamLayout:
    """Where each trainable tensor lives in a flat parameter vector [n_params]."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, model: nn.Module) -> ParamLayout:
        p = trainable_params(model)
        if not p:
            raise RefusedError("the model has no trainable parameters (requires_grad=False everywhere); "
                             "check model.trainable")
        return cls(tuple(p), tuple(tuple(v.shape) for v in p.values()))

    @property
    def sizes(self) -> list[int]:
        return [int(torch.Size(s).numel()) for s in self.shapes]

    @property
    def n_params(self) -> int:
        return sum(self.sizes)

    def slices(self) -> dict[str, slice]:
        """Tensor name -> its slice of the flat vector."""
        out, o = {}, 0
        for name, size in zip(self.names, self.sizes):
            out[name] = slice(o, o + size)
            o += size
        return out

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Dict of parameter-shaped tensors -> [n_params]."""
        return torch.cat([tensors[k].reshape(-1) for k in self.names])

    def unflatten(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """[n_params] -> dict of parameter-shaped views."""
        return {k: t.view(s) for k, t, s in zip(self.names, v.split(self.sizes), self.shapes)}
