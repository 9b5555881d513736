"""`fico`: FICO HELOC (the Explainable Machine Learning Challenge's home-equity credit data;
docs/method.md §5), binary classification of RiskPerformance (Bad = 0, Good = 1) from 23
features.

FICO's licence forbids redistribution, so there is no download: the user obtains
`heloc_dataset_v1.csv` (10,459 rows) from FICO, or the Kaggle copy the authors used, and puts it
in `dataset.root=<folder>` or `$TDA_DATA_DIR/fico`.

Preprocessing, exactly as the authors' `load_and_process_FICO`, in this order (the special
values: −9 no bureau record, −8 no usable trades, −7 condition not met):

1. rows whose 23 features are all −9 are dropped (588 rows: 9,871 remain);
2. MSinceMostRecentDelq: −7 (no delinquency in the window) -> the column's maximum + 1, −8 ->
   the mean of its non-negative values (taken before step 2 changed anything);
3. MSinceMostRecentInqexcl7days: −7 (an inquiry within 7 days) -> 0, then −8 -> its maximum + 1;
4. MaxDelq2PublicRecLast12M: values above 7 ("other") -> 7 ("current and never delinquent");
5. every remaining −8, then every remaining −9, -> its column's mean of non-negative values
   (recomputed before the −9 pass); any other −7 is left as it is.

Then a 90/10 split with seed 0 (8,883 / 988) and all 23 features standardised with training
statistics (tda.data.tabular.split_standardise). `raw` holds the values after steps 1–5.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from tda.config import ConfigError
from tda.data.base import DataBundle, data_root
from tda.data.tabular import split_standardise

FILE = "heloc_dataset_v1.csv"
LABEL = "RiskPerformance"
CLASSES = ["Bad", "Good"]  # sorted, as scikit-learn's LabelEncoder codes them
FEATURES = ["ExternalRiskEstimate", "MSinceOldestTradeOpen", "MSinceMostRecentTradeOpen", "AverageMInFile",
            "NumSatisfactoryTrades", "NumTrades60Ever2DerogPubRec", "NumTrades90Ever2DerogPubRec",
            "PercentTradesNeverDelq", "MSinceMostRecentDelq", "MaxDelq2PublicRecLast12M", "MaxDelqEver",
            "NumTotalTrades", "NumTradesOpeninLast12M", "PercentInstallTrades", "MSinceMostRecentInqexcl7days",
            "NumInqLast6M", "NumInqLast6Mexcl7days", "NetFractionRevolvingBurden", "NetFractionInstallBurden",
            "NumRevolvingTradesWBalance", "NumInstallTradesWBalance", "NumBank2NatlTradesWHighUtilization",
            "PercentTradesWBalance"]
WHERE_TO_GET = ("FICO publishes it under a licence that forbids redistribution: request it at "
                "https://community.fico.com/s/explainable-machine-learning-challenge (the authors used the Kaggle "
                "copy, https://www.kaggle.com/datasets/averkiyoliabev/home-equity-line-of-creditheloc)")


def fico(root: str | None = None, file: str = FILE, test_size: float = 0.1, split_seed: int = 0,
         max_train: int | None = None, max_test: int | None = None, subsample_seed: int = 0) -> DataBundle:
    folder = data_root("fico", root)
    if folder is None or not (folder / file).is_file():
        where = f"{folder} has no {file}" if folder is not None else "no local copy is configured"
        raise FileNotFoundError(
            f"dataset fico reads the HELOC CSV {file}, but {where}. {WHERE_TO_GET}. Put the CSV in a folder and set "
            f"dataset.root=<folder> (or TDA_DATA_DIR=<dir> holding fico/{file}); dataset.file=<name> if it is named "
            f"differently")
    path = folder / file
    table = pd.read_csv(path)
    missing = [c for c in (*FEATURES, LABEL) if c not in table.columns]
    extra = [c for c in table.columns if c not in (*FEATURES, LABEL)]
    if missing or extra:
        raise ConfigError(f"dataset fico: {path} is not the HELOC file: "
                          + (f"it lacks the columns {missing}" if missing else "")
                          + ("; " if missing and extra else "") + (f"it has the extra columns {extra}" if extra else "")
                          + f". Replace it with FICO's heloc_dataset_v1.csv ({WHERE_TO_GET})")
    labels = table[LABEL].astype(str).str.strip()
    unknown = sorted(set(labels) - set(CLASSES))
    if unknown:
        raise ConfigError(f"dataset fico: {path} has {LABEL} values {unknown[:5]}; expected {CLASSES}")
    features = table[FEATURES].astype(np.float64)
    recorded = (features > -9).any(axis=1)  # rows with at least one bureau value
    features = clean_special_values(features[recorded].reset_index(drop=True))
    y = labels[recorded].map(CLASSES.index).to_numpy(np.int64)
    return split_standardise(features, y, FEATURES, name="fico", test_size=test_size, split_seed=split_seed,
                             max_train=max_train, max_test=max_test, subsample_seed=subsample_seed,
                             class_names=CLASSES,
                             info={"source": str(path), "label": f"{LABEL} (Bad=0, Good=1)",
                                   "rows_dropped_all_missing": int((~recorded).sum()),
                                   "special_values": "the authors' load_and_process_FICO (tda/data/fico.py)"})


def clean_special_values(data: pd.DataFrame) -> pd.DataFrame:
    """Steps 2-5 of the module docstring on [n, 23] float features (a new frame)."""
    data = data.copy()
    col = "MSinceMostRecentDelq"
    delq_mean = data.loc[data[col] >= 0, col].mean()
    data.loc[data[col] == -7, col] = data[col].max() + 1
    data.loc[data[col] == -8, col] = delq_mean
    col = "MSinceMostRecentInqexcl7days"
    data.loc[data[col] == -7, col] = 0.0
    data.loc[data[col] == -8, col] = data[col].max() + 1
    col = "MaxDelq2PublicRecLast12M"
    data.loc[data[col] > 7, col] = 7.0
    for special in (-8, -9):
        means = data[data >= 0].mean()  # per column, over its non-negative values
        for name in data.columns:
            data.loc[data[name] == special, name] = means[name]
    return data
