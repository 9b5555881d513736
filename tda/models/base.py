"""The model interface: a frozen feature extractor followed by a trainable part.

`trainable` is a model option used by final training, further training and every
attribution method alike:
- `all`: every parameter trains; the frozen part is empty.
- `head`: only the output layer trains; the rest is frozen.
- `last_k`: the last `k` blocks plus the head train.

When a frozen part exists, its outputs ("features") are computed once in eval mode and
cached, and everything downstream works on (trainable part, features). This makes further
training and attribution of a head run at tabular speed, but it changes the question being
asked: attribution is then of the head's sensitivity, with the encoder held fixed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TDAModel(nn.Module):
    """Subclasses implement :meth:`split` and set `self.trainable` / `self.trainable_k`."""

    trainable: str = "all"
    trainable_k: int = 1
    # What inputs the model can take: DataBundle.modality values, and the number of
    # per-instance input dimensions if fixed (3 for images [C, H, W]). Checked against the
    # data before the model is built (:meth:`input_problem`).
    modalities: tuple[str, ...] = ("tabular", "image", "text")
    input_dims: int | None = None

    @classmethod
    def input_problem(cls, model: str, dataset: str, modality: str, input_shape: list[int] | None) -> str | None:
        """Why this model cannot take a dataset's inputs (`modality`, per-instance `input_shape`;
        None when the data is empty), or None when it can; `model` / `dataset` name them."""
        if modality in cls.modalities and (cls.input_dims is None or input_shape is None
                                           or len(input_shape) == cls.input_dims):
            return None
        kinds = {"image": "image inputs [C, H, W]", "text": "token ids [L]", "tabular": "feature vectors"}
        options = {"image": "model=small_cnn or model=resnet9", "text": "model=text_classifier", "tabular": "model=mlp"}
        return (f"model={model} needs {' or '.join(kinds[m] for m in cls.modalities)}, but dataset {dataset} is "
                f"{modality} data with inputs of shape {input_shape}; use {options.get(modality, 'another model')} "
                f"for it, or a {'/'.join(cls.modalities)} dataset")

    def split(self) -> tuple[nn.Module | None, nn.Module]:
        """(frozen feature extractor or None, trainable module); composing them is `forward`."""
        raise NotImplementedError

    def trainable_part(self) -> nn.Module:
        return self.split()[1]

    def freeze_non_trainable(self) -> None:
        """Set requires_grad so that only the trainable part's parameters train."""
        frozen, _ = self.split()
        if frozen is not None:
            for p in frozen.parameters():
                p.requires_grad_(False)


def check_input_shape(model: str, input_shape, dims: int, what: str) -> tuple[int, ...]:
    """`input_shape` (per instance) has `dims` dimensions, else one message with the fix."""
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != dims:
        raise ValueError(f"model {model} needs {what} inputs, but the data's inputs have shape {list(shape)}; "
                         f"use model=mlp for tabular data, or a dataset of {what} (e.g. dataset=digits)")
    return shape


def match_mode(model: nn.Module, *wrappers: nn.Module | None) -> None:
    """Wrappers built by split() start in train mode; give them the model's mode, or
    compute_features (which restores the frozen part's mode) would switch shared layers
    (dropout, batch norm) into train mode."""
    for w in wrappers:
        if w is not None:
            w.training = model.training


def check_trainable(trainable: str, allowed: tuple[str, ...] = ("all", "head", "last_k")) -> str:
    if trainable not in allowed:
        raise ValueError(f"model.trainable={trainable!r} is not one of {allowed}; "
                         f"choose e.g. model.trainable=all")
    return trainable


def per_example_loss(output: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    """Loss of each example, shape [n]: cross-entropy (classification, output [n, C]) or
    squared error (regression, output [n, 1] or [n]). This is g(z, θ) of docs/method.md §2"""
    if task == "classification":
        return F.cross_entropy(output, y, reduction="none")
    if task == "regression":
        return (output.reshape(y.shape) - y).pow(2)
    raise ValueError(f"unknown task {task!r}; expected 'classification' or 'regression'")


@torch.no_grad()
def compute_features(frozen: nn.Module | None, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Outputs of the frozen part, in eval mode, batched; identity when nothing is frozen."""
    if frozen is None:
        return x
    was_training = frozen.training
    frozen.eval()
    device = next(frozen.parameters()).device
    outs = [frozen(x[i:i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)]
    frozen.train(was_training)
    return torch.cat(outs)
