"""Shared tabular preprocessing of the paper's Folktables data (and of the ACS excerpt, which
is processed the same way):

- categorical columns are one-hot coded, with columns named `<VAR>_<label>` where the label
  comes from the PUMS code list (a code missing from the list keeps its code as label);
  as in folktables' `df_to_pandas(..., dummies=True)`, a column exists for every value that
  occurs in the (filtered) data, and a missing value (NaN) is its own category;
- only the listed numeric columns are standardised, with mean / std of the training split;
- the split is scikit-learn's `train_test_split(test_size, random_state=split_seed)`, done
  after one-hot coding (the paper's notebook does the same).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import datasets
import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from tda.config import ConfigError
from tda.data.base import DataBundle, subsample

MISSING = "__missing__"  # key of a code list's label for a missing value


def one_hot(df: pd.DataFrame, numeric: Sequence[str], categorical: Sequence[str],
            code_lists: Mapping[str, Mapping] | None = None) -> pd.DataFrame:
    """[n, n_features] float frame: the numeric columns first (unscaled), then one-hot blocks
    in the order of `categorical`, each block's columns in sorted code order."""
    code_lists = code_lists or {}
    parts = [df[list(numeric)].astype(np.float64)]
    for col in categorical:
        codes = df[col]
        labels = code_lists.get(col, {})
        values = sorted(codes.dropna().unique().tolist())
        block = {}
        for v in values:
            label = labels.get(v, labels.get(_as_key(v), _code_text(v)))
            block[f"{col}_{label}"] = (codes == v).to_numpy(np.float64)
        if codes.isna().any():
            block[f"{col}_{labels.get(MISSING, 'N/A')}"] = codes.isna().to_numpy(np.float64)
        parts.append(pd.DataFrame(block, index=df.index))
    out = pd.concat(parts, axis=1)
    dup = out.columns[out.columns.duplicated()].tolist()
    if dup:  # two codes with the same label: keep them apart
        raise ValueError(f"one-hot column names collide: {dup[:5]}")
    return out


def _code_text(v) -> str:
    """A code without a label, written as in the survey (8680, not 8680.0)."""
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


def _as_key(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def split_standardise(features: pd.DataFrame, labels: np.ndarray, standardise: Sequence[str], *, name: str,
                      test_size: float, split_seed: int, max_train: int | None, max_test: int | None,
                      subsample_seed: int, class_names: list[str], info: dict) -> DataBundle:
    """Split, standardise `standardise` columns with training statistics, build the bundle.
    x [n, n_features] float32 (model input); raw [n, n_features] (unscaled, for reports)."""
    x = features.to_numpy(np.float64)
    if not len(x):  # train_test_split's own message would not say which file to check
        raise ConfigError(f"dataset {name}: its data has no rows (after its filters). Check the data file it reads "
                          f"(dataset.root=... or TDA_DATA_DIR) and replace it with a complete copy")
    idx = np.arange(len(x))
    tr, te = train_test_split(idx, test_size=test_size, random_state=split_seed)
    cols = [features.columns.get_loc(c) for c in standardise]
    mean = x[tr][:, cols].mean(0)
    std = x[tr][:, cols].std(0)
    std[std == 0] = 1.0  # a constant column stays constant (0) instead of dividing by zero
    scaled = x.copy()
    scaled[:, cols] = (x[:, cols] - mean) / std

    def build(rows):
        return datasets.Dataset.from_dict({"x": scaled[rows].astype(np.float32), "y": labels[rows].astype(np.int64),
                                           "raw": x[rows].astype(np.float32)})

    names = [str(c) for c in features.columns]
    info = dict(info) | {"n_features": len(names), "standardised": {c: {"mean": float(m), "std": float(s)}
                                                                     for c, m, s in zip(standardise, mean, std)},
                         "n_rows": len(x), "positive_rate": float(labels.mean()), "raw_feature_names": names}
    return DataBundle(name=name, train=subsample(build(tr), max_train, subsample_seed),
                      test=subsample(build(te), max_test, subsample_seed + 1), task="classification", n_outputs=2,
                      modality="tabular", feature_names=names, class_names=class_names, info=info)
