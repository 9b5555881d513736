"""Data that cannot be used, refused with one message naming the problem and the fix: a dataset
that cannot be loaded (offline with nothing cached, no network, an empty data file) and loaded
data that no model can be trained on (empty splits, NaN/inf inputs or targets, bad labels)."""

from __future__ import annotations

import contextlib
import socket
import urllib.error
from collections.abc import Iterator

from hydra.errors import InstantiationException
from pandas.errors import EmptyDataError

from tda.config import ConfigError
from tda.data.base import DataBundle
from tda.env import offline

# what a download that cannot happen raises (huggingface_hub's offline and connection errors,
# `requests`' ConnectionError and `datasets`' "Couldn't reach" are ConnectionErrors or OSErrors
# among these)
NETWORK_ERRORS: tuple[type[BaseException], ...] = (ConnectionError, urllib.error.URLError, socket.gaierror,
                                                   TimeoutError)
try:
    from huggingface_hub.errors import LocalEntryNotFoundError

    NETWORK_ERRORS += (LocalEntryNotFoundError,)
except ImportError:  # pragma: no cover - huggingface_hub comes with datasets
    pass
try:
    from requests.exceptions import ConnectionError as RequestsConnectionError

    NETWORK_ERRORS += (RequestsConnectionError,)
except ImportError:  # pragma: no cover - requests comes with datasets
    pass


@contextlib.contextmanager
def loading_errors(dataset: str) -> Iterator[None]:
    """Turn the usual failures of loading `dataset` into one ConfigError with the fix; errors
    the loader already explains (ConfigError, FileNotFoundError naming dataset.root /
    TDA_DATA_DIR) and anything else pass unchanged."""
    try:
        yield
    except InstantiationException as wrapped:  # Hydra's wrapper: report the loader's own error
        if wrapped.__cause__ is None:
            raise
        _raise_explained(dataset, wrapped.__cause__)
        raise wrapped.__cause__ from None
    except Exception as err:
        _raise_explained(dataset, err)
        raise


def _raise_explained(dataset: str, err: BaseException) -> None:
    if isinstance(err, EmptyDataError):
        raise ConfigError(f"dataset {dataset}: a data file it reads is empty ({err}). Replace it with a complete copy "
                          f"(dataset.root=... or TDA_DATA_DIR) or delete it so that it is downloaded again") from err
    if not isinstance(err, NETWORK_ERRORS):
        return
    if offline():
        raise ConfigError(f"dataset {dataset} needs a download, but offline mode is on "
                          f"(HF_DATASETS_OFFLINE / HF_HUB_OFFLINE / TDA_OFFLINE) and no local copy was found "
                          f"({type(err).__name__}: {err}). Either unset the offline variables to download it once, "
                          f"or point dataset.root (or $TDA_DATA_DIR/<dataset>) at a local copy") from err
    raise ConfigError(f"dataset {dataset} could not be downloaded ({type(err).__name__}: {err}). Check the network "
                      f"connection, or point dataset.root (or $TDA_DATA_DIR/<dataset>) at a local copy") from err


def data_problems(data: DataBundle, dataset: str) -> list[str]:
    """What makes loaded data (`dataset`: its name in the config) unusable: empty splits,
    NaN/inf inputs or targets, class labels outside the classes (named by split and column)."""
    problems = []
    values = data.value_problems()
    if values:
        problems.append(f"dataset {dataset} holds values no model can be trained on:\n      "
                        + "\n      ".join(values) + "\n    Clean the data (drop or impute the missing values, fix "
                        "the labels) or check the data file its loader reads (dataset.root / TDA_DATA_DIR)")
    if len(data.train) == 0:
        problems.append(f"dataset {dataset} has no training rows; check the data file it reads (empty?) and "
                        f"dataset.max_train")
    if len(data.test) == 0:
        problems.append(f"dataset {dataset} has no test rows; check the data file it reads (empty?), "
                        f"dataset.test_size and dataset.max_test")
    return problems
