"""Label noise as data (the `label_noise` section): a seeded fraction of the TRAINING labels flipped to
another class, the setting of mislabel detection (docs/evaluation.md, "Mislabel detection").

It is applied to the DataBundle that any loader returns (tda.stages.inputs.load_data), so no loader
knows about it, and every later stage sees the same noisy training labels: final training learns
from them, the methods and the gold standard attribute them. The test split is never touched.

⌊fraction · n_train⌋ rows are drawn without replacement by `numpy.random.default_rng(seed)` and each
gets a class drawn uniformly from the other n_classes − 1, as dattri's `flip_label` does (seeded
here). What was flipped (rows, original and new labels) is the DataBundle's `label_noise` record,
which the train stage writes into `selection.json` beside the left-out and test indices; the final
model's identity covers it (tda.provenance.selection_fingerprint). The settings are part of the run
key only when labels are flipped, so run directories without noise keep their names.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from tda.config import ConfigError
from tda.data.base import DataBundle
from tda.sections import KEYED_UNLESS_DEFAULT, Checks, Section, setting


@dataclass(frozen=True)
class LabelNoiseSettings(Section):
    """`label_noise`: which training labels are flipped (classification only; recorded in
    selection.json and part of the run key when fraction > 0)."""

    PATH = "label_noise"
    fraction: float = setting(0.0, "fraction of the training labels flipped to another class (classification only)",
                              "0 flips none; e.g. label_noise.fraction=0.1", key=KEYED_UNLESS_DEFAULT)
    seed: int = setting(0, "seed of which labels flip and to which class", key=KEYED_UNLESS_DEFAULT)

    def check(self, c: Checks) -> None:
        c.within("fraction", 0, 1, " (a fraction of the training rows)")
        c.non_negative("seed")

    def keyed(self) -> dict[str, Any]:
        """The settings that define the noisy data: none without noise (a seed then flips nothing)."""
        return super().keyed() if self.fraction > 0 else {}


def flip_labels(y: np.ndarray, n_classes: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows [k], their new labels [k]): k = ⌊fraction · len(y)⌋ distinct rows (sorted), each given a
    class other than its own, uniformly among the n_classes − 1 others."""
    n = len(y)
    k = math.floor(fraction * n + 1e-9)  # 0.3 · 10 is 2.9999999999999996 in floating point
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=k, replace=False))
    shift = rng.integers(1, n_classes, size=k)  # 1..n_classes-1: never the label itself
    return rows, (y[rows] + shift) % n_classes


def with_label_noise(data: DataBundle, settings: LabelNoiseSettings) -> DataBundle:
    """`data` with the training labels of `settings` flipped and recorded in `label_noise` (the
    data itself when fraction = 0). Refused (ConfigError) for a regression task, which has no
    classes, and for a fraction too small to flip any of the training rows."""
    if settings.fraction == 0:
        return data
    if data.task != "classification":
        raise ConfigError(f"label_noise.fraction={settings.fraction} flips class labels, but {data.name} is a "
                          f"{data.task} dataset (its targets have no classes to flip to); set label_noise.fraction=0")
    y = np.asarray(data.train["y"], dtype=np.int64)
    rows, new = flip_labels(y, data.n_outputs, settings.fraction, settings.seed)
    if len(rows) == 0:
        raise ConfigError(f"label_noise.fraction={settings.fraction} flips ⌊{settings.fraction} × {len(y)}⌋ = 0 of "
                          f"the {len(y)} training labels of {data.name}; raise it to at least {1 / max(len(y), 1):.3g}")
    labels = y.copy()
    labels[rows] = new
    train = data.train.remove_columns("y").add_column("y", labels.tolist(), feature=data.train.features["y"])
    record = {"fraction": settings.fraction, "seed": settings.seed, "n_flipped": len(rows),
              "flipped_indices": rows.tolist(), "original_labels": y[rows].tolist(), "noisy_labels": new.tolist()}
    return dataclasses.replace(data, train=train, label_noise=record)


def recorded_settings(record: dict[str, Any] | None) -> LabelNoiseSettings:
    """The settings a `label_noise` record of selection.json was made with (none: no noise)."""
    if not record:
        return LabelNoiseSettings()
    return LabelNoiseSettings(fraction=record["fraction"], seed=record["seed"])
