"""The paper's MLP (docs/method.md §5): in -> 128 -> 128 -> out, ReLU.

Head: `n_outputs` comes from the data: classification -> one logit per class (cross-entropy);
regression -> one output (the paper's Concrete / Energy MLP; squared error, see
`per_example_loss`). `head_bias=false` drops the output bias.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from tda.models.base import TDAModel, check_trainable, match_mode


class MLP(TDAModel):
    modalities = ("tabular", "image")  # images are flattened; token ids are not features

    def __init__(self, input_shape: Sequence[int], n_outputs: int, hidden: Sequence[int] = (128, 128),
                 trainable: str = "all", trainable_k: int = 1, dropout: float = 0.0,
                 head_bias: bool = True):
        super().__init__()
        self.trainable = check_trainable(trainable)
        self.trainable_k = int(trainable_k)
        in_features = math.prod(input_shape)
        blocks: list[nn.Module] = [nn.Flatten()] if len(input_shape) > 1 else []
        widths = [in_features, *hidden]
        for a, b in zip(widths[:-1], widths[1:]):
            block = [nn.Linear(a, b), nn.ReLU()]
            if dropout > 0:
                block.append(nn.Dropout(dropout))
            blocks.append(nn.Sequential(*block))
        self.body = nn.Sequential(*blocks)
        self.head = nn.Linear(widths[-1], n_outputs, bias=head_bias)
        if self.trainable == "last_k" and not 0 < self.trainable_k <= len(hidden):
            raise ValueError(f"model.trainable_k={trainable_k} must be in 1..{len(hidden)} for this MLP")

    @classmethod
    def argument_problems(cls, arguments: dict, key: str) -> list[str]:
        """`trainable_k` against the hidden layers (checked before anything is built); `arguments`
        holds every parameter, the constructor's defaults filled in (tda.config.target_problems)."""
        hidden, k = arguments["hidden"], arguments["trainable_k"]
        if arguments["trainable"] == "last_k" and isinstance(k, int) and not 0 < k <= len(hidden):
            return [f"{key}.trainable_k={k} must be in 1..{len(hidden)}: this MLP has {len(hidden)} hidden layers "
                    f"({key}.hidden={list(hidden)}); lower {key}.trainable_k or add layers"]
        return []

    def forward(self, x):
        return self.head(self.body(x))

    def split(self):
        if self.trainable == "all":
            return None, self
        if self.trainable == "head":
            return self.body, self.head
        k = self.trainable_k
        frozen, rest = self.body[:-k], self.body[-k:]
        trainable = nn.Sequential(rest, self.head)
        match_mode(self, frozen, rest, trainable)
        return frozen, trainable
