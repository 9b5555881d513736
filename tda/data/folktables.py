"""Folktables ACSIncome (docs/method.md §5): the paper's main tabular dataset.

Source: the `folktables` package. Online it downloads the raw PUMS person file and the PUMS
data dictionary from census.gov; offline it reads a local folder laid out as folktables
itself lays it out:

    <root>/<year>/<horizon>/psam_p<state code>.csv     e.g. <root>/2018/1-Year/psam_p25.csv
    <root>/<year>/<horizon>/definition.csv             the PUMS data dictionary (CSV), which
                                                       may also be named
                                                       PUMS_Data_Dictionary_<year>.csv

`<root>` is `dataset.root=` or `$TDA_DATA_DIR/folktables`; with neither, downloads go to
`dataset.download_dir` (default `~/.cache/tda/folktables`).

Preprocessing, exactly as the paper's notebook: ACSIncome's filters (AGEP > 16, PINCP > 100,
WKHP > 0, PWGTP >= 1), label PINCP > 50,000, categoricals mapped to their labels from the
code lists (`generate_categories`) and one-hot coded (`df_to_pandas(dummies=True)`; 791
features for MA 2018), only AGEP and WKHP standardised with training-split statistics,
75/25 split with seed 0 (30,085 / 10,029 rows for MA 2018).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tda.data.base import DataBundle, data_root
from tda.data.tabular import split_standardise
from tda.env import offline
from tda.extras import requires_extra

NUMERIC = ("AGEP", "WKHP")  # the only standardised columns in the paper


@requires_extra("folktables")
def folktables_income(state: str = "MA", year: int = 2018, horizon: str = "1-Year", root: str | None = None,
                      download_dir: str = "~/.cache/tda/folktables", test_size: float = 0.25, split_seed: int = 0,
                      max_train: int | None = None, max_test: int | None = None,
                      subsample_seed: int = 0) -> DataBundle:
    from folktables import ACSDataSource, ACSIncome, generate_categories  # noqa: PLC0415 - optional: the tda[folktables] extra

    local = data_root("folktables", root)
    base = Path(local if local is not None else Path(download_dir).expanduser())
    year_dir = base / str(year) / horizon
    person_file = year_dir / f"psam_p{_state_code(state)}.csv"
    dictionary = _dictionary_file(year_dir, year)
    need = [str(p) for p, ok in ((person_file, person_file.is_file()),
                                 (year_dir / "definition.csv", dictionary is not None)) if not ok]
    if need and (local is not None or offline()):
        why = f"the local copy {base} lacks it" if local is not None else "we are offline and no local copy is set"
        raise FileNotFoundError(
            f"Folktables {state} {year} {horizon} needs {', '.join(need)} but {why}. Put the PUMS person file and the "
            f"data dictionary (definition.csv or PUMS_Data_Dictionary_{year}.csv) in <root>/{year}/{horizon}/ and set "
            f"dataset.root=<root> (or TDA_DATA_DIR=<dir> holding folktables/), or run online without a local root "
            f"to download them into dataset.download_dir.")
    source = ACSDataSource(survey_year=str(year), horizon=horizon, survey="person", root_dir=str(base))
    raw = source.get_data(states=[state], download=person_file.name in " ".join(need))
    if dictionary is not None:
        definitions = pd.read_csv(dictionary, sep=",", header=None, names=list(range(7)))
    else:
        definitions = source.get_definitions(download=True)
    categories = generate_categories(features=ACSIncome.features, definition_df=definitions)
    features, label, _ = ACSIncome.df_to_pandas(raw, categories=categories, dummies=True)
    features = features.astype(np.float64)
    y = label.to_numpy().reshape(-1).astype(np.int64)
    return split_standardise(features, y, NUMERIC, name="folktables", test_size=test_size, split_seed=split_seed,
                             max_train=max_train, max_test=max_test, subsample_seed=subsample_seed,
                             class_names=["<=50K", ">50K"],
                             info={"source": f"folktables ACSIncome {state} {year} {horizon}", "root": str(base)})


def _state_code(state: str) -> str:
    from folktables.load_acs import _STATE_CODES  # noqa: PLC0415 - optional: the tda[folktables] extra

    if state not in _STATE_CODES:
        raise ValueError(f"dataset.state={state!r} is not a US state code folktables knows (e.g. MA, CA)")
    return _STATE_CODES[state]


def _dictionary_file(year_dir: Path, year: int) -> Path | None:
    """The PUMS data dictionary: folktables' name (`definition.csv`) or the census one."""
    for name in ("definition.csv", f"PUMS_Data_Dictionary_{year}.csv"):
        if (year_dir / name).is_file():
            return year_dir / name
    return None
