"""ResNet-9, the network commonly used for fast CIFAR-10 training (Page, "How to train your
ResNet"; the DAWNBench / airbench family):

    prep:   conv(64)                                   32x32
    layer1: conv(128) + maxpool, residual(conv(128), conv(128))   16x16
    layer2: conv(256) + maxpool                                 8x8
    layer3: conv(512) + maxpool, residual(conv(512), conv(512))    4x4
    head:   global max pool, flatten, linear(n_outputs) * scale

where every conv is conv3x3-BatchNorm-ReLU. `width` scales every channel count (1.0 = the
standard 6.5M-parameter network; 0.25 trains in minutes on a CPU).

Batch norm and attribution: final training and further training run in train mode (batch
statistics, running averages updated, as any user of the model would train it). Every
attribution method and every loss evaluation runs in EVAL mode, so batch norm is a fixed
affine map with the running statistics: per-example gradients (vmap) and Hessian products
are then those of a function of one instance, as the methods assume.

Which parameters train: `all`; `head` (the linear layer; everything before it is frozen and
its pooled features [n, 512*width] are cached); `last_k` (the last k of the stages prep,
layer1, layer2, layer3 plus the head; k <= 3).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tda.models.base import TDAModel, check_input_shape, check_trainable, match_mode
from tda.ranges import memory_problem


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=False))


class Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(channels, channels), conv_bn(channels, channels))

    def forward(self, x):
        return x + self.body(x)


class Scale(nn.Module):
    """Multiplies the logits by a constant (0.125 in the reference ResNet-9), which keeps
    the initial softmax soft and lets a large learning rate work."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return x * self.scale


class GlobalMaxPool(nn.Module):
    """[n, C, H, W] -> [n, C]: max over positions. Equals AdaptiveMaxPool2d(1) + Flatten, whose
    CUDA backward has no deterministic implementation (final training is deterministic)."""

    def forward(self, x):
        return x.amax(dim=(-2, -1))


class ResNet9(TDAModel):
    modalities = ("image",)
    input_dims = 3

    def __init__(self, input_shape: Sequence[int], n_outputs: int, width: float = 1.0, scale: float = 0.125,
                 trainable: str = "all", trainable_k: int = 1):
        super().__init__()
        self.trainable = check_trainable(trainable)
        self.trainable_k = int(trainable_k)
        c = [max(1, int(round(w * width))) for w in (64, 128, 256, 512)]
        c_in = check_input_shape("resnet9", input_shape, 3, "image [C, H, W]")[0]
        self.stages = nn.Sequential(
            conv_bn(c_in, c[0]),
            nn.Sequential(conv_bn(c[0], c[1]), nn.MaxPool2d(2), Residual(c[1])),
            nn.Sequential(conv_bn(c[1], c[2]), nn.MaxPool2d(2)),
            nn.Sequential(conv_bn(c[2], c[3]), nn.MaxPool2d(2), Residual(c[3])),
            GlobalMaxPool(),
        )
        self.head = nn.Sequential(nn.Linear(c[3], n_outputs, bias=False), Scale(scale))
        if self.trainable == "last_k" and not 0 < self.trainable_k <= 3:
            raise ValueError(f"model.trainable_k={trainable_k} must be in 1..3 (of the 4 conv stages of ResNet-9, "
                             f"at least the first stays frozen; use model.trainable=all to train everything)")

    @classmethod
    def argument_problems(cls, arguments: dict, key: str) -> list[str]:
        """`trainable_k` against the stages and `width` against this machine's memory (checked
        before anything is built); `arguments` holds every parameter, the constructor's defaults
        filled in (tda.config.target_problems)."""
        k, width = arguments["trainable_k"], arguments["width"]
        if arguments["trainable"] == "last_k" and isinstance(k, int) and not 0 < k <= 3:
            return [f"{key}.trainable_k={k} must be in 1..3 (of the 4 conv stages of ResNet-9, at least the first "
                    f"stays frozen); use {key}.trainable=all to train everything"]
        # the conv weights grow with width² (6.5M parameters at width 1), in float32 (a product,
        # not `**`, which raises OverflowError where the product becomes inf)
        w = max(1.0, float(width))
        n_weights = 6.5e6 * w * w
        problem = memory_problem(f"{key}.width={width}", 4.0 * n_weights, f"about {n_weights:.3g} weights",
                                 f"lower {key}.width (1.0 is the standard network)")
        return [problem] if problem else []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(x))

    def split(self):
        if self.trainable == "all":
            return None, self
        if self.trainable == "head":
            return self.stages, self.head
        # stages[0..3] are the conv stages, stages[4:] the pooling: the pooling (no parameters)
        # goes with the trainable part so that the frozen output is the last frozen stage's map
        cut = 4 - self.trainable_k
        frozen, rest = self.stages[:cut], self.stages[cut:]
        trainable = nn.Sequential(rest, self.head)
        match_mode(self, frozen, rest, trainable)
        return frozen, trainable
