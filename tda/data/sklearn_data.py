"""Embedded defaults: real datasets that scikit-learn ships, so the pipeline runs offline.

- `breast_cancer`: 569 tumours x 30 features, binary (tabular; standardised with training
  statistics).
- `digits`: 1,797 handwritten digits, 8x8 grey images, 10 classes (images [1, 8, 8] in [0, 1]).
- `diabetes`: 442 patients x 10 features -> disease progression after one year, regression
  with the paper's regression recipe (tda.data.uci.regression_bundle: 90/10 split, features
  and target standardised with training statistics).
"""

from __future__ import annotations

import datasets
import numpy as np
from sklearn import datasets as skdata
from sklearn.model_selection import train_test_split

from tda.data.base import DataBundle, subsample
from tda.data.uci import regression_bundle


def _split(x: np.ndarray, y: np.ndarray, test_size: float, seed: int):
    return train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)


def breast_cancer(test_size: float = 0.25, split_seed: int = 0, max_train: int | None = None,
                  max_test: int | None = None, subsample_seed: int = 0) -> DataBundle:
    raw = skdata.load_breast_cancer()
    x_tr, x_te, y_tr, y_te = _split(raw.data, raw.target, test_size, split_seed)
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-12  # training statistics only
    def build(x, y):
        return datasets.Dataset.from_dict({"x": ((x - mean) / std).astype(np.float32), "y": y.astype(np.int64),
                                           "raw": x.astype(np.float32)})
    train = subsample(build(x_tr, y_tr), max_train, subsample_seed)
    test = subsample(build(x_te, y_te), max_test, subsample_seed + 1)
    names = [str(n) for n in raw.feature_names]
    return DataBundle(name="breast_cancer", train=train, test=test, task="classification", n_outputs=2,
                      modality="tabular", feature_names=names, class_names=[str(c) for c in raw.target_names],
                      info={"source": "sklearn.datasets.load_breast_cancer", "raw_feature_names": names})


def digits(test_size: float = 0.25, split_seed: int = 0, max_train: int | None = None,
           max_test: int | None = None, subsample_seed: int = 0) -> DataBundle:
    raw = skdata.load_digits()
    images = (raw.images / 16.0).astype(np.float32)[:, None]  # [n, 1, 8, 8] in [0, 1]
    x_tr, x_te, y_tr, y_te = _split(images, raw.target, test_size, split_seed)
    def build(x, y):
        return datasets.Dataset.from_dict({"x": x, "y": y.astype(np.int64)})
    train = subsample(build(x_tr, y_tr), max_train, subsample_seed)
    test = subsample(build(x_te, y_te), max_test, subsample_seed + 1)
    return DataBundle(name="digits", train=train, test=test, task="classification", n_outputs=10,
                      modality="image", class_names=[str(i) for i in range(10)],
                      info={"source": "sklearn.datasets.load_digits"})


def diabetes(test_size: float = 0.1, split_seed: int = 0, max_train: int | None = None,
             max_test: int | None = None, subsample_seed: int = 0) -> DataBundle:
    raw = skdata.load_diabetes(scaled=False)  # original units (age in years, sex 1/2, ...)
    return regression_bundle(raw.data, raw.target, raw.feature_names, name="diabetes", test_size=test_size,
                             split_seed=split_seed, max_train=max_train, max_test=max_test,
                             subsample_seed=subsample_seed,
                             info={"source": "sklearn.datasets.load_diabetes(scaled=False)",
                                   "target": "disease progression one year after baseline"})
