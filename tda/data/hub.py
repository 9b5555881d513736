"""Hugging Face hub datasets with a local-copy fallback: one parquet file per split in the
hub's own schema, found through `dataset.root=` or `$TDA_DATA_DIR/<dataset>`."""

from __future__ import annotations

from collections.abc import Mapping

import datasets

from tda.data.base import data_root
from tda.env import offline


def load_splits(name: str, hub_id: str, splits: Mapping[str, str], root: str | None = None) -> datasets.DatasetDict:
    """{our split: dataset} for `splits` = {our split name: upstream split name}.
    Local copy: `<root>/<upstream split>.parquet`; else the hub (online only)."""
    folder = data_root(name, root)
    if folder is not None:
        files = {ours: folder / f"{theirs}.parquet" for ours, theirs in splits.items()}
        missing = [str(f) for f in files.values() if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"local copy of {name} in {folder} lacks {missing}; it must hold one parquet file "
                                    f"per split in the schema of the hub dataset {hub_id} (set dataset.root=<folder>)")
        return datasets.load_dataset("parquet", data_files={k: str(v) for k, v in files.items()})
    if offline():
        raise FileNotFoundError(
            f"dataset {name} needs a download from the Hugging Face hub ({hub_id}) but we are offline. Point "
            f"dataset.root=<folder> (or TDA_DATA_DIR=<dir holding {name}/>) at a local copy: one parquet file per "
            f"split ({', '.join(f'{s}.parquet' for s in splits.values())}) in the hub dataset's schema.")
    loaded = datasets.load_dataset(hub_id)
    return datasets.DatasetDict({ours: loaded[theirs] for ours, theirs in splits.items()})
