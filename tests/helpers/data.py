"""Test data written by the tests: a tiny census PUMS file and its data dictionary (the layout
folktables reads), small UCI Concrete / Energy sheets and a FICO HELOC file in the layouts their
loaders read, and the embedded breast-cancer data damaged as a user's own loader might deliver
it (a `_target_` for `dataset`: `helpers.data.damaged_breast_cancer`)."""

from __future__ import annotations

import datasets
import numpy as np
import pandas as pd

from tda.data.base import DataBundle
from tda.data.fico import FEATURES as FICO_FEATURES
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
                          value: float | str = "nan", label: float | str | None = None, regression: bool = False,
                          max_train: int = 96, max_test: int = 40) -> DataBundle:
    """The embedded breast-cancer data as a user's own loader might deliver it: `rows` rows of
    input `column` set to `value` (NaN / inf), or their label set to `label`; `regression`
    turns the label into a float target (task regression, one output). A non-finite value comes
    as a string ("inf", "nan"): pre-flight refuses a non-finite number among a loader's arguments."""
    data = breast_cancer(max_train=max_train, max_test=max_test)
    ds = data.train if split == "train" else data.test
    cols = ds.to_dict()
    x = np.asarray(cols["x"], dtype=np.float32)
    y = np.asarray(cols["y"], dtype=np.float64 if regression else np.int64)
    if column is not None:
        x[:rows, column] = float(value)
    if label is not None:
        y = y.astype(np.float64)
        y[:rows] = float(label)
    damaged = datasets.Dataset.from_dict({"x": x, "y": y, "raw": cols["raw"]})
    other = data.test if split == "train" else data.train
    if regression:
        other = other.map(lambda r: {"y": float(r["y"])})
    train_ds, test_ds = (damaged, other) if split == "train" else (other, damaged)
    return DataBundle(name="damaged", train=train_ds, test=test_ds,
                      task="regression" if regression else "classification", n_outputs=1 if regression else 2,
                      modality="tabular", feature_names=data.feature_names,
                      class_names=None if regression else data.class_names, info={})


# ------------------------------------------------------------------ UCI regression sheets, FICO HELOC
CONCRETE_HEADER = ["Cement (component 1)(kg in a m^3 mixture)", "Blast Furnace Slag (component 2)(kg in a m^3 mixture)",
                   "Fly Ash (component 3)(kg in a m^3 mixture)", "Water  (component 4)(kg in a m^3 mixture)",
                   "Superplasticizer (component 5)(kg in a m^3 mixture)",
                   "Coarse Aggregate  (component 6)(kg in a m^3 mixture)",
                   "Fine Aggregate (component 7)(kg in a m^3 mixture)", "Age (day)",
                   "Concrete compressive strength(MPa, megapascals) "]


def write_concrete(folder, n=50, seed=0) -> pd.DataFrame:
    """Concrete_Data.csv in UCI's column layout (8 features, then the strength); column 8 (age)
    is 1..n, so a row can be found again from its raw features."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(rng.uniform(0, 500, size=(n, 9)).round(2), columns=CONCRETE_HEADER)
    df[CONCRETE_HEADER[7]] = np.arange(1, n + 1, dtype=np.float64)
    folder.mkdir(parents=True, exist_ok=True)
    df.to_csv(folder / "Concrete_Data.csv", index=False)
    return df


def write_energy(folder, n=40, seed=0) -> pd.DataFrame:
    """ENB2012_data.csv as the .xlsx can read: X1..X8, Y1, Y2, then an empty column and empty
    rows; X2 is 0, 10, 20, ... so a row can be found again."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(rng.uniform(0, 50, size=(n, 10)).round(2), columns=[f"X{i}" for i in range(1, 9)] + ["Y1", "Y2"])
    df["X2"] = np.arange(n) * 10.0
    padded = pd.concat([df, pd.DataFrame(np.nan, index=range(3), columns=df.columns)], ignore_index=True)
    padded["Unnamed: 10"] = np.nan
    folder.mkdir(parents=True, exist_ok=True)
    padded.to_csv(folder / "ENB2012_data.csv", index=False)
    return df


def write_heloc(folder, n: int = 24) -> tuple[pd.DataFrame, pd.DataFrame]:
    """heloc_dataset_v1.csv with special values in the columns the authors treat specially;
    NumTotalTrades is the row number (never special) so rows can be found again. Returns the
    file's table and, by hand, the features after the authors' treatment of the kept rows
    (n >= 10; rows past the 8th are ordinary)."""
    rng = np.random.default_rng(0)
    df = pd.DataFrame(rng.integers(0, 60, size=(n, len(FICO_FEATURES))), columns=FICO_FEATURES)
    df["NumTotalTrades"] = np.arange(n)
    df.insert(0, "RiskPerformance", ["Bad", "Good"] * (n // 2))
    delq = [10, 20, -7, -8, 30, -9, -7, 40] + [0] * (n - 8)          # mean of the >= 0 values
    inq = [3, -7, -8, 5, 24, -9, -8, 0] + [1] * (n - 8)
    maxdelq = [7, 8, 9, 6, 2, 7, 3, 7] + [5] * (n - 8)
    ext = [60, -8, 70, -9, 80, 90, -8, 50] + [60] * (n - 8)
    df["MSinceMostRecentDelq"], df["MSinceMostRecentInqexcl7days"] = delq, inq
    df["MaxDelq2PublicRecLast12M"], df["ExternalRiskEstimate"] = maxdelq, ext
    df.loc[n - 2:, FICO_FEATURES] = -9                                   # two rows with no bureau record
    folder.mkdir(parents=True, exist_ok=True)
    df.to_csv(folder / "heloc_dataset_v1.csv", index=False)

    kept = df.iloc[: n - 2][FICO_FEATURES].astype(float).copy()
    # by hand, on the kept rows (the dropped all -9 rows take no part in any mean or maximum):
    d = kept["MSinceMostRecentDelq"]
    d_mean = np.mean([v for v in d if v >= 0])                         # (10+20+30+40+0*14)/18
    d_max = 40
    kept["MSinceMostRecentDelq"] = [d_max + 1 if v == -7 else d_mean if v == -8 else v for v in d]
    i = kept["MSinceMostRecentInqexcl7days"]
    i_max = 24                                                         # max after -7 -> 0
    kept["MSinceMostRecentInqexcl7days"] = [0 if v == -7 else i_max + 1 if v == -8 else v for v in i]
    kept["MaxDelq2PublicRecLast12M"] = [min(v, 7) for v in kept["MaxDelq2PublicRecLast12M"]]
    for special in (-8, -9):
        for col in kept.columns:
            mean = kept[col][kept[col] >= 0].mean()
            kept[col] = [mean if v == special else v for v in kept[col]]
    return df, kept
