"""`acs_ma2018`: the real ACS PUMS excerpt (Massachusetts, 2018 1-Year; NIST SDNist "Diverse
Community Data Excerpts") as an ACSIncome-style task. This is the real tabular dataset that
runs without internet (`$TDA_DATA_DIR/acs_ma2018` or `dataset.root=`).

It is the same survey, state and year as the paper's Folktables data but not the folktables
schema, so the task uses the nearest columns it has:

    ACSIncome  AGEP  SCHL  MAR  OCCP          SEX  RAC1P  COW  POBP  RELP  WKHP
    here       AGEP  EDU   MSP  INDP (industry) SEX  RAC1P  (missing ...................)

Filters as ACSIncome where the columns exist: AGEP > 16, PINCP > 100 (missing PINCP
dropped), PWGTP >= 1 (WKHP > 0 cannot be applied); label PINCP > 50,000. Preprocessing as
the paper's Folktables data: categoricals one-hot coded with labels from the excerpt's code
lists (`data_dictionary.json`), only the numeric AGEP standardised with training statistics,
75/25 split with seed 0.

Files: `ma2018.csv` (missing values written `N`) and `data_dictionary.json`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from tda.data.base import DataBundle, data_root
from tda.data.tabular import MISSING, one_hot, split_standardise

CSV = "ma2018.csv"
DICTIONARY = "data_dictionary.json"


def acs_ma2018(root: str | None = None, numeric: Sequence[str] = ("AGEP",),
               categorical: Sequence[str] = ("EDU", "MSP", "INDP", "SEX", "RAC1P"), test_size: float = 0.25,
               split_seed: int = 0, max_train: int | None = None, max_test: int | None = None,
               subsample_seed: int = 0) -> DataBundle:
    folder = data_root("acs_ma2018", root)
    if folder is None or not (folder / CSV).is_file():
        raise FileNotFoundError(
            f"acs_ma2018 is a local-only dataset and {CSV} was not found "
            f"({'in ' + str(folder) if folder else 'no local copy configured'}); set dataset.root=<folder with {CSV} "
            f"and {DICTIONARY}> or TDA_DATA_DIR=<dir holding acs_ma2018/>. It is published in usnistgov/SDNist "
            f"(BenchmarkData/ACSDataExcerpts/massachusetts).")
    df = pd.read_csv(folder / CSV, na_values=["N"], keep_default_na=False, dtype={"PUMA": str})
    code_lists = _code_lists(folder / DICTIONARY)
    unknown = [c for c in (*numeric, *categorical) if c not in df.columns]
    if unknown:
        raise ValueError(f"dataset.numeric/categorical name columns {unknown} that {CSV} does not have; "
                         f"it has {list(df.columns)}")
    df = df[(df["AGEP"] > 16) & (df["PINCP"] > 100) & (df["PWGTP"] >= 1)].reset_index(drop=True)
    y = (df["PINCP"] > 50_000).to_numpy(np.int64)
    features = one_hot(df, numeric, categorical, code_lists)
    return split_standardise(features, y, list(numeric), name="acs_ma2018", test_size=test_size,
                             split_seed=split_seed, max_train=max_train, max_test=max_test,
                             subsample_seed=subsample_seed, class_names=["<=50K", ">50K"],
                             info={"source": str(folder / CSV), "filters": "AGEP>16, PINCP>100, PWGTP>=1",
                                   "label": "PINCP>50000"})


def _code_lists(path: Path) -> dict[str, dict]:
    """{column: {code: label}} from the excerpt's dictionary; numeric codes become floats so
    they match the CSV's parsed values; range entries (min / max) are not codes."""
    if not path.is_file():
        return {}
    out: dict[str, dict] = {}
    for col, entry in json.loads(path.read_text()).items():
        values = entry.get("values")
        if not isinstance(values, dict):
            continue
        codes = {}
        for code, label in values.items():
            if code in ("min", "max"):
                continue
            if code == "N":
                codes[MISSING] = label
                continue
            try:
                codes[float(code)] = label
            except ValueError:
                codes[code] = label
        out[col] = codes
    return out
