"""The paper's UCI regression datasets, Concrete and Energy (docs/method.md §5), and the paper's
regression recipe, which the embedded `diabetes` data (tda.data.sklearn_data) shares.

Recipe (the authors' notebook): a 90/10 split with scikit-learn's
`train_test_split(test_size=0.1, random_state=0)`; every feature AND the target standardised
with the training split's mean and (population) standard deviation; a single output trained
with squared error. The target's mean / std are recorded in `DataBundle.info` so predictions
can be mapped back to the original unit.

Files (the ones the authors read):

- `concrete`: `Concrete_Data.xls` (UCI "Concrete Compressive Strength", 1,030 rows; the first
  8 columns are the features, the 9th the compressive strength in MPa).
- `energy`: `ENB2012_data.xlsx` (UCI "Energy efficiency", 768 rows; features X1..X8, target Y1
  = heating load as in the paper, or Y2 = cooling load with `dataset.target=Y2`).

They are found in `dataset.root=<folder>` or `$TDA_DATA_DIR/<name>`; with neither, in
`dataset.download_dir`, where the zip UCI serves is downloaded and the file extracted when
online. pandas reads .xls with `xlrd` and .xlsx with `openpyxl` (the `tda[uci]` extra); a CSV
copy of the sheet (`Concrete_Data.csv`, `ENB2012_data.csv`) is read when the sheet is absent.
"""

from __future__ import annotations

import io
import os
import urllib.request
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from tda.config import ConfigError
from tda.data.base import DataBundle, data_root, subsample
from tda.env import offline
from tda.extras import requires_extra

SPREADSHEET_READERS = {".xls": "xlrd", ".xlsx": "openpyxl"}  # pandas' engine per file type


@dataclass(frozen=True)
class UCIFile:
    """Where a UCI dataset's file comes from."""

    name: str      # dataset name, and its folder under TDA_DATA_DIR
    page: str      # the dataset's page at UCI (licence, description)
    archive: str   # the zip UCI serves
    sheet: str     # the spreadsheet in the zip, as the authors read it

    @property
    def csv(self) -> str:
        return Path(self.sheet).with_suffix(".csv").name


CONCRETE = UCIFile("concrete", "https://archive.ics.uci.edu/dataset/165/concrete+compressive+strength",
                   "https://archive.ics.uci.edu/static/public/165/concrete+compressive+strength.zip",
                   "Concrete_Data.xls")
ENERGY = UCIFile("energy", "https://archive.ics.uci.edu/dataset/242/energy+efficiency",
                 "https://archive.ics.uci.edu/static/public/242/energy+efficiency.zip", "ENB2012_data.xlsx")
ENERGY_FEATURES = {"X1": "relative compactness", "X2": "surface area", "X3": "wall area", "X4": "roof area",
                   "X5": "overall height", "X6": "orientation", "X7": "glazing area",
                   "X8": "glazing area distribution"}
ENERGY_TARGETS = {"Y1": "heating load", "Y2": "cooling load"}


@requires_extra("uci")
def concrete(root: str | None = None, download_dir: str = "~/.cache/tda/concrete", test_size: float = 0.1,
             split_seed: int = 0, max_train: int | None = None, max_test: int | None = None,
             subsample_seed: int = 0) -> DataBundle:
    """UCI Concrete Compressive Strength: 8 mixture / age features -> strength (MPa)."""
    table, path = read_uci_table(CONCRETE, root, download_dir)
    if table.shape[1] != 9:
        raise ConfigError(f"dataset concrete: {path} has {table.shape[1]} columns {list(table.columns)}; the UCI file "
                          f"has 9 (8 features, then the compressive strength). Replace it with the file from "
                          f"{CONCRETE.page}")
    names = [" ".join(str(c).split()) for c in table.columns]  # the file's headers carry double spaces
    return regression_bundle(table.iloc[:, :8].to_numpy(np.float64), table.iloc[:, 8].to_numpy(np.float64),
                             names[:8], name="concrete", test_size=test_size, split_seed=split_seed,
                             max_train=max_train, max_test=max_test, subsample_seed=subsample_seed,
                             info={"source": str(path), "target": names[8]})


@requires_extra("uci")
def energy(root: str | None = None, download_dir: str = "~/.cache/tda/energy", target: str = "Y1",
           test_size: float = 0.1, split_seed: int = 0, max_train: int | None = None, max_test: int | None = None,
           subsample_seed: int = 0) -> DataBundle:
    """UCI Energy efficiency: 8 building-shape features X1..X8 -> heating (Y1) or cooling
    (Y2) load; the other target is dropped, as the paper drops Y2."""
    if target not in ENERGY_TARGETS:
        raise ConfigError(f"dataset.target={target!r}: the energy data has targets Y1 (heating load, the paper's) "
                          f"and Y2 (cooling load)")
    table, path = read_uci_table(ENERGY, root, download_dir)
    missing = [c for c in (*ENERGY_FEATURES, target) if c not in table.columns]
    if missing:
        raise ConfigError(f"dataset energy: {path} lacks the columns {missing} (it has {list(table.columns)}); "
                          f"replace it with the file from {ENERGY.page}")
    names = [f"{c} {meaning}" for c, meaning in ENERGY_FEATURES.items()]
    return regression_bundle(table[list(ENERGY_FEATURES)].to_numpy(np.float64), table[target].to_numpy(np.float64),
                             names, name="energy", test_size=test_size, split_seed=split_seed, max_train=max_train,
                             max_test=max_test, subsample_seed=subsample_seed,
                             info={"source": str(path), "target": f"{target} {ENERGY_TARGETS[target]}"})


def regression_bundle(x: np.ndarray, y: np.ndarray, feature_names: Sequence[str], *, name: str, test_size: float,
                      split_seed: int, max_train: int | None, max_test: int | None, subsample_seed: int,
                      info: dict) -> DataBundle:
    """The paper's regression recipe on x [n, d], y [n] (original units): split, standardise
    features and target with the training split's statistics (a constant column stays 0),
    subsample. Columns: x [d] and y (float32, standardised), raw [d] (original units)."""
    if not len(x):
        raise ConfigError(f"dataset {name}: its data has no rows. Check the data file it reads (dataset.root=... or "
                          f"TDA_DATA_DIR) and replace it with a complete copy")
    tr, te = train_test_split(np.arange(len(x)), test_size=test_size, random_state=split_seed)
    x_mean, x_std = _mean_std(x[tr])
    y_mean, y_std = _mean_std(y[tr])
    x_scaled, y_scaled = (x - x_mean) / x_std, (y - y_mean) / y_std

    def build(rows):
        return datasets.Dataset.from_dict({"x": x_scaled[rows].astype(np.float32),
                                           "y": y_scaled[rows].astype(np.float32), "raw": x[rows].astype(np.float32)})

    names = [str(n) for n in feature_names]
    info = dict(info) | {"n_rows": len(x), "n_features": len(names), "raw_feature_names": names,
                         "target_mean": float(y_mean), "target_std": float(y_std),
                         "standardised": {n: {"mean": float(m), "std": float(s)}
                                          for n, m, s in zip(names, x_mean, x_std)}}
    return DataBundle(name=name, train=subsample(build(tr), max_train, subsample_seed),
                      test=subsample(build(te), max_test, subsample_seed + 1), task="regression", n_outputs=1,
                      modality="tabular", feature_names=names, info=info)


def _mean_std(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population std over rows (as scikit-learn's StandardScaler); a zero std
    becomes 1 so that a constant column stays constant instead of dividing by zero."""
    mean, std = values.mean(0), values.std(0)
    return mean, np.where(std == 0, 1.0, std)


# ------------------------------------------------------------------ finding, downloading, reading the file
def read_uci_table(source: UCIFile, root: str | None, download_dir: str) -> tuple[pd.DataFrame, Path]:
    """The dataset's table (rows and columns that are entirely empty dropped) and the file it
    was read from: a local copy (`dataset.root` / `$TDA_DATA_DIR/<name>`), else the download
    folder, downloading the UCI zip into it when the file is not there yet."""
    local = data_root(source.name, root)
    folder = local if local is not None else Path(download_dir).expanduser()
    path = _file_in(folder, source)
    if path is None:
        if local is not None or offline():
            why = (f"the local copy {folder} lacks it" if local is not None else
                   f"offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE / TDA_OFFLINE) and {folder} lacks it")
            raise FileNotFoundError(
                f"dataset {source.name} needs {source.sheet} (or a CSV copy of it, {source.csv}), but {why}. Download "
                f"{source.archive} (from {source.page}), put {source.sheet} from it into a folder and set "
                f"dataset.root=<folder> (or TDA_DATA_DIR=<dir> holding {source.name}/), or run online without a "
                f"local root to download it into dataset.download_dir")
        path = _download(source, folder)
    return _read(path, source), path


def _file_in(folder: Path, source: UCIFile) -> Path | None:
    """The spreadsheet if it is there, else a CSV copy of it if that is there."""
    return next((p for p in (folder / source.sheet, folder / source.csv) if p.is_file()), None)


def _download(source: UCIFile, folder: Path) -> Path:
    """Download UCI's zip and extract the spreadsheet into `folder` (written whole or not at all)."""
    with urllib.request.urlopen(source.archive, timeout=120) as response:
        archive = zipfile.ZipFile(io.BytesIO(response.read()))
    member = next((m for m in archive.namelist() if Path(m).name == source.sheet), None)
    if member is None:
        raise ConfigError(f"dataset {source.name}: the archive {source.archive} holds {archive.namelist()}, not "
                          f"{source.sheet}; download the data from {source.page} by hand and set dataset.root")
    folder.mkdir(parents=True, exist_ok=True)
    path, partial = folder / source.sheet, folder / f".{source.sheet}.part"
    partial.write_bytes(archive.read(member))
    os.replace(partial, path)
    return path


def _read(path: Path, source: UCIFile) -> pd.DataFrame:
    suffix = path.suffix.lower()
    damaged: tuple[type[Exception], ...] = (ValueError, OSError, zipfile.BadZipFile)
    if suffix == ".xls":
        from xlrd import XLRDError  # noqa: PLC0415 - optional: the tda[uci] extra

        damaged += (XLRDError,)
    try:
        table = pd.read_csv(path) if suffix == ".csv" else pd.read_excel(path, engine=SPREADSHEET_READERS[suffix])
    except damaged as err:  # a damaged or foreign file
        raise ConfigError(f"dataset {source.name}: {path} cannot be read ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:200]}); replace it with the file from {source.page}") from err
    return table.dropna(axis=0, how="all").dropna(axis=1, how="all").reset_index(drop=True)
