"""Test data written by the tests: a tiny census PUMS file and its data dictionary (the layout
folktables reads), and the embedded breast-cancer data damaged as a user's own loader might deliver
it (a `_target_` for `dataset`: `helpers.data.damaged_breast_cancer`)."""

from __future__ import annotations

import datasets
import numpy as np
import pandas as pd

from tda.data.base import DataBundle
from tda.data.sklearn_data import breast_cancer

# ------------------------------------------------------------------ a tiny PUMS file + dictionary
FEATURES = ["AGEP", "COW", "SCHL", "MAR", "OCCP", "POBP", "RELP", "WKHP", "SEX", "RAC1P"]
CODES = {  # code -> label, as in the census PUMS data dictionary (a subset)
    "COW": {"1": "Employee of a private for-profit company", "2": "Employee of a private not-for-profit",
            "3": "Local government employee"},
    "SCHL": {"16": "Regular high school diploma", "21": "Bachelor's degree", "22": "Master's degree"},
    "MAR": {"1": "Married", "5": "Never married or under 15 years old"},
    "OCCP": {"0010": "MGR-Chief Executives And Legislators", "1010": "CMM-Computer Programmers",
             "3255": "MED-Registered Nurses"},
    "POBP": {"025": "Massachusetts/MA", "036": "New York/NY", "210": "China"},
    "RELP": {"00": "Reference person", "01": "Husband/wife", "02": "Biological son or daughter"},
    "SEX": {"1": "Male", "2": "Female"},
    "RAC1P": {"1": "White alone", "2": "Black or African American alone", "6": "Asian alone"},
}


def write_dictionary(path):
    """The PUMS data dictionary CSV layout folktables reads (NAME / VAL rows, 7 columns)."""
    rows = ["NAME,RT,C,1,Record Type", "VAL,RT,C,1,P,P,Person Record"]
    for var in ("AGEP", "WKHP", "PINCP", "PWGTP"):
        rows += [f"NAME,{var},N,5,{var}", f"VAL,{var},N,5,0,99999,{var} value"]
    for var, codes in CODES.items():
        rows.append(f"NAME,{var},C,4,{var}")
        if var == "COW":
            rows.append(f"VAL,{var},C,1,b,b,N/A (not a worker)")
        rows += [f'VAL,{var},C,4,{code},{code},"{label}"' for code, label in codes.items()]
    path.write_text("\n".join(rows) + "\n")


def write_pums(path, n=120, seed=0) -> pd.DataFrame:
    """A PUMS-format person file whose rows hit every ACSIncome filter boundary."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"RT": "P", "SERIALNO": [f"2018GQ{i:07d}" for i in range(n)], "ST": 25})
    for var, codes in CODES.items():
        df[var] = rng.choice([int(c) for c in codes], size=n)
    df["AGEP"] = rng.integers(14, 80, size=n)
    df["WKHP"] = rng.integers(0, 60, size=n)
    df["PINCP"] = rng.choice([-500, 0, 100, 101, 20000, 50000, 50001, 90000], size=n).astype(float)
    df["PWGTP"] = rng.integers(0, 4, size=n)
    df.loc[:9, "AGEP"] = [16, 17, 16, 17, 30, 30, 30, 30, 40, 40]   # boundary rows
    df.loc[:9, "WKHP"] = [20, 20, 20, 20, 0, 1, 20, 20, 20, 20]
    df.loc[:9, "PINCP"] = [60000, 60000, 60000, 60000, 60000, 60000, 100, 101, 50000, 50001]
    df.loc[:9, "PWGTP"] = [1, 1, 1, 1, 1, 1, 1, 1, 0, 1]
    df["COW"] = df["COW"].astype("Int64")
    df.loc[rng.random(n) < 0.1, "COW"] = pd.NA  # blank = N/A in PUMS files
    df.to_csv(path, index=False)
    return df


# ------------------------------------------------------------------ a user's own loader, damaged
def damaged_breast_cancer(split: str = "train", column: int | None = None, rows: int = 0,
                          value: float = float("nan"), label: float | None = None, regression: bool = False,
                          max_train: int = 96, max_test: int = 40) -> DataBundle:
    """The embedded breast-cancer data as a user's own loader might deliver it: `rows` rows of
    input `column` set to `value` (NaN / inf), or their label set to `label`; `regression`
    turns the label into a float target (task regression, one output)."""
    data = breast_cancer(max_train=max_train, max_test=max_test)
    ds = data.train if split == "train" else data.test
    cols = ds.to_dict()
    x = np.asarray(cols["x"], dtype=np.float32)
    y = np.asarray(cols["y"], dtype=np.float64 if regression else np.int64)
    if column is not None:
        x[:rows, column] = value
    if label is not None:
        y = y.astype(np.float64)
        y[:rows] = label
    damaged = datasets.Dataset.from_dict({"x": x, "y": y, "raw": cols["raw"]})
    other = data.test if split == "train" else data.train
    if regression:
        other = other.map(lambda r: {"y": float(r["y"])})
    train_ds, test_ds = (damaged, other) if split == "train" else (other, damaged)
    return DataBundle(name="damaged", train=train_ds, test=test_ds,
                      task="regression" if regression else "classification", n_outputs=1 if regression else 2,
                      modality="tabular", feature_names=data.feature_names,
                      class_names=None if regression else data.class_names, info={})
