"""The dataset interface shared by every loader.

A loader builds Hugging Face `datasets.Dataset` splits with two model-facing columns,
`x` (the model input: a feature vector, an image tensor [C, H, W], or token ids [L]) and
`y` (class index or regression target), plus any human-readable columns it wants to keep
for reports (`text`, `image`, raw features). It wraps them in a :class:`DataBundle`.

Subsampling (`max_train`, `max_test`) is applied here, seeded, so that any dataset runs at
CPU scale reproducibly.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
import torch

Task = Literal["classification", "regression"]
Modality = Literal["tabular", "image", "text"]


@dataclass
class DataBundle:
    name: str
    train: datasets.Dataset
    test: datasets.Dataset
    task: Task
    n_outputs: int
    modality: Modality
    feature_names: list[str] | None = None
    class_names: list[str] | None = None
    # anything a loader wants to record with the run (source, preprocessing statistics, ...)
    info: dict[str, Any] = field(default_factory=dict)
    # Data augmentation for FINAL training only: a function of a batch x [b, ...] -> [b, ...]
    # (e.g. random flips). Further training and attribution never see it: the gold standard
    # and the methods are defined on the fixed training set D.
    final_training_transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    # the training labels flipped by tda.data.label_noise (rows, original and new labels; written to
    # selection.json by the train stage); None: the labels as loaded
    label_noise: dict[str, Any] | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.tensors("train", limit=1)[0].shape[1:])

    def tensors(self, split: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [n, ...], y [n]) of a split as torch tensors (float32 inputs unless token ids)."""
        ds = self.train if split == "train" else self.test
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        batch = ds.with_format("torch", columns=["x", "y"])[:]
        x, y = batch["x"], batch["y"]
        if x.is_floating_point():
            x = x.float()
        y = y.long() if self.task == "classification" else y.float()
        return x, y

    def describe(self, split: str, index: int) -> dict[str, Any]:
        """A human-readable view of one instance for reports: tabular -> {feature: value},
        text -> {"text": ...}, image -> {"image": PIL.Image}. Always includes the label."""
        ds = self.train if split == "train" else self.test
        row = ds[int(index)]
        label = row["y"]
        out: dict[str, Any] = {"label": self.class_names[int(label)] if self.class_names else label}
        if self.modality == "text":
            out["text"] = row.get("text", "")
        elif self.modality == "image":
            out["image"] = row.get("image")
        elif self.feature_names is not None:
            x = np.asarray(row.get("raw", row["x"]))
            names = self.info.get("raw_feature_names", self.feature_names)
            nz = [(n, v) for n, v in zip(names, x.tolist()) if v != 0 or len(names) <= 40]
            out.update(dict(nz))
        return out

    def value_problems(self) -> list[str]:
        """What makes the model-facing values unusable, one line per split and column: NaN/inf
        inputs (named by feature where `feature_names` exist, else by flat column index of
        x [n, d] / [n, C*H*W]), non-finite regression targets, class labels outside
        0..n_outputs-1. A NaN input turns training, every method score and the gold standard
        into NaN, so it is refused at load, where the message can name the column."""
        problems = []
        for split in ("train", "test"):
            ds = self.train if split == "train" else self.test
            batch = ds.with_format("torch", columns=["x", "y"])[:]
            x, y = batch["x"], batch["y"]
            if x.is_floating_point() and len(x):
                bad = ~torch.isfinite(x.reshape(len(x), -1))  # [n, d]
                columns = bad.any(0).nonzero().flatten().tolist()
                names = self.feature_names if self.feature_names and len(self.feature_names) == bad.shape[1] else None
                for c in columns[:5]:
                    label = f"feature {names[c]!r} (column {c})" if names else f"column {c} of the flattened input"
                    problems.append(f"{split} split: {label} holds NaN/inf in {int(bad[:, c].sum())} of {len(x)} rows")
                if len(columns) > 5:
                    problems.append(f"{split} split: {len(columns) - 5} more input columns hold NaN/inf")
            problems += self._label_problems(split, y)
        return problems

    def _label_problems(self, split: str, y: torch.Tensor) -> list[str]:
        if not len(y):
            return []
        if y.is_floating_point() and not bool(torch.isfinite(y).all()):
            return [f"{split} split: {int((~torch.isfinite(y)).sum())} of {len(y)} labels (y) are NaN/inf"]
        if self.task != "classification":
            return []
        if y.is_floating_point() and not bool((y == y.round()).all()):
            return [f"{split} split: {int((y != y.round()).sum())} of {len(y)} class labels (y) are not whole numbers"]
        outside = (y < 0) | (y >= self.n_outputs)
        if bool(outside.any()):
            return [f"{split} split: {int(outside.sum())} of {len(y)} class labels (y) are outside "
                    f"0..{self.n_outputs - 1} (the {self.n_outputs} classes), e.g. {y[outside][0].item():g}"]
        return []

    def fingerprint(self) -> str:
        """Hash of the model-facing content, recorded with every run so a later stage can
        detect that the data changed underneath it."""
        h = hashlib.sha256()
        for split in ("train", "test"):
            x, y = self.tensors(split)
            h.update(str(tuple(x.shape)).encode())
            h.update(x.numpy().tobytes())
            h.update(y.numpy().tobytes())
        return h.hexdigest()[:16]


def subsample(ds: datasets.Dataset, max_rows: int | None, seed: int) -> datasets.Dataset:
    """A seeded subset of `max_rows` rows, kept in the original order (None = all rows)."""
    if max_rows is None or max_rows >= len(ds):
        return ds
    if max_rows <= 0:
        raise ValueError(f"max rows must be positive, got {max_rows}")
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(ds), size=max_rows, replace=False))
    return ds.select(keep.tolist())


def data_root(dataset_dir: str, root: str | None = None) -> Path | None:
    """Where a local copy of a dataset lives: the `dataset.root=` override if given, else
    `$TDA_DATA_DIR/<dataset_dir>` if that folder exists, else None (download from upstream).
    A `TDA_DATA_DIR` that does not exist is an error, never silently a download."""
    if root:
        path = Path(root).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"dataset.root={root} does not exist; point it at a local copy of the data")
        return path
    env = os.environ.get("TDA_DATA_DIR")
    if env:
        if not Path(env).expanduser().is_dir():
            raise FileNotFoundError(f"TDA_DATA_DIR={env} does not exist (or is not a folder); point it at the folder "
                                    f"that holds the local copies (<TDA_DATA_DIR>/{dataset_dir}/...), or unset it to "
                                    f"download from upstream")
        path = Path(env).expanduser() / dataset_dir
        if path.exists():
            return path
    return None
