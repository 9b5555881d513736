"""A small CNN for small images (the `digits` embedded default): two conv-ReLU-pool blocks
and a linear head. Cheap enough for tests of every stage on images."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from tda.models.base import TDAModel, check_input_shape, check_trainable


class SmallCNN(TDAModel):
    modalities = ("image",)
    input_dims = 3

    def __init__(self, input_shape: Sequence[int], n_outputs: int, channels: Sequence[int] = (8, 16),
                 trainable: str = "all", trainable_k: int = 1):
        super().__init__()
        self.trainable = check_trainable(trainable, ("all", "head"))
        self.trainable_k = trainable_k
        c_in, h, w = check_input_shape("small_cnn", input_shape, 3, "image [C, H, W]")
        layers: list[nn.Module] = []
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c_in, h, w = c, h // 2, w // 2
        self.body = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(c_in * h * w, n_outputs)

    def forward(self, x):
        return self.head(self.body(x))

    def split(self):
        return (None, self) if self.trainable == "all" else (self.body, self.head)
