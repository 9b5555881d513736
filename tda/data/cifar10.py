"""CIFAR-10: the hub dataset `uoft-cs/cifar10` through `datasets` when online, or a local folder
of parquet files in the same schema (`train.parquet`, `test.parquet`; `img` PNG, `label`)
through `dataset.root=` or `$TDA_DATA_DIR/cifar10`.

x = image [3, 32, 32] in [0, 1], normalised per channel with the standard CIFAR-10 training
mean / std; the original image is kept in the `image` column for reports.

Augmentation (`flip`, `crop_padding`) applies to FINAL training only, through
`DataBundle.final_training_transform`: further training and every attribution method work
on the fixed, unaugmented training set, which is the set the gold standard leaves
instances out of.
"""

from __future__ import annotations

from typing import Annotated

import datasets
import numpy as np
import torch
import torch.nn.functional as F

from tda.data.base import DataBundle, subsample
from tda.data.hub import load_splits
from tda.ranges import Range

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
# pixels of padding around the 32×32 image before a random 32×32 crop
CROP_PADDING = Range(0, 31, why=" (pixels of padding before a random crop; at 32 or more a crop can miss the image "
                                "entirely)", example=4)
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def cifar10(root: str | None = None, max_train: int | None = None, max_test: int | None = None,
            subsample_seed: int = 0, flip: bool = False, crop_padding: Annotated[int, CROP_PADDING] = 0) -> DataBundle:
    raw = load_splits("cifar10", "uoft-cs/cifar10", {"train": "train", "test": "test"}, root)
    mean = np.asarray(MEAN, np.float32)[:, None, None]
    std = np.asarray(STD, np.float32)[:, None, None]

    def encode(batch):
        imgs = np.stack([np.asarray(im.convert("RGB"), np.float32) for im in batch["img"]]) / 255.0
        x = (imgs.transpose(0, 3, 1, 2) - mean) / std  # [b, 3, 32, 32]
        return {"x": x, "y": np.asarray(batch["label"], np.int64), "image": batch["img"]}

    features = datasets.Features({"x": datasets.Array3D((3, 32, 32), "float32"), "y": datasets.Value("int64"),
                                  "image": datasets.Image()})

    def prepare(ds, n, seed):
        ds = subsample(ds, n, seed)
        return ds.map(encode, batched=True, batch_size=500, features=features, remove_columns=ds.column_names,
                      desc="cifar10: normalise")

    train = prepare(raw["train"], max_train, subsample_seed)
    test = prepare(raw["test"], max_test, subsample_seed + 1)
    transform = augment(flip, crop_padding) if (flip or crop_padding) else None
    return DataBundle(name="cifar10", train=train, test=test, task="classification", n_outputs=10, modality="image",
                      class_names=list(CLASSES), final_training_transform=transform,
                      info={"source": "uoft-cs/cifar10", "normalisation": {"mean": MEAN, "std": STD},
                            "final_training_augmentation": {"flip": bool(flip), "crop_padding": int(crop_padding)}})


def augment(flip: bool, crop_padding: int):
    """Random horizontal flips and random crops after zero padding, per image, for a batch
    x [b, C, H, W]; uses torch's global generator, which final training seeds."""

    def transform(x: torch.Tensor) -> torch.Tensor:
        if flip:
            x = torch.where(torch.rand(len(x), 1, 1, 1, device=x.device) < 0.5, x.flip(-1), x)
        if crop_padding:
            p = int(crop_padding)
            h, w = x.shape[-2:]
            padded = F.pad(x, (p, p, p, p))
            dy = torch.randint(0, 2 * p + 1, (len(x),)).tolist()
            dx = torch.randint(0, 2 * p + 1, (len(x),)).tolist()
            x = torch.stack([padded[i, :, a:a + h, b:b + w] for i, (a, b) in enumerate(zip(dy, dx))])
        return x

    return transform
