"""Seeded, recorded choice of the left-out training instances and evaluated test instances,
and its settings (the `selection` section).

Three rules choose the left-out instances: a seeded random choice (optionally stratified by
class), every k-th training row (`left_out_every`, the paper's regression runs), or a list read
from a file (`left_out_file`, e.g. the authors' published index files)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from tda.artifacts import file_sha256
from tda.config import ConfigError
from tda.data.base import DataBundle
from tda.sections import KEYED_UNLESS_DEFAULT, Checks, Section, setting

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SelectionSettings(Section):
    """`selection`: which instances are attributed and evaluated (recorded in selection.json
    and part of the run directory's key)."""

    PATH = "selection"
    n_left_out: int | None = setting(40, "training instances attributed (left out one at a time)",
                                     "null attributes every training row")
    n_test: int | None = setting(40, "test instances evaluated", "null evaluates every test instance")
    seed: int = setting(0, "seed of the choice")
    stratify: bool = setting(True, "left-out instances stratified by class (classification only; a regression "
                                   "target has no classes)")
    test: Literal["first", "random"] = setting("first", "which test instances (the paper evaluates the first 100)")
    left_out_every: int | None = setting(None, "left out: training rows 0, k, 2k, ... (the first n_left_out of "
                                         "them); null: a seeded random choice", key=KEYED_UNLESS_DEFAULT)
    left_out_file: str | None = setting(None, "left out: the training-row indices listed in this file (JSON list, "
                                        "or a torch tensor file read with weights_only=True)",
                                        "null: a seeded random choice", key=KEYED_UNLESS_DEFAULT)

    def check(self, c: Checks) -> None:
        c.positive("n_left_out")
        c.positive("n_test")
        c.non_negative("seed")
        c.positive("left_out_every")
        if self.left_out_every is not None and self.left_out_file is not None:
            c.add("selection.left_out_every and selection.left_out_file both choose the left-out instances; set one "
                  "of them to null")

    def fit_problems(self, n_train: int, n_test: int, dataset: str) -> list[str]:
        """The selection against the data's size: no more instances than rows."""
        problems = []
        if self.n_left_out is not None and n_train and self.n_left_out > n_train:
            problems.append(f"selection.n_left_out={self.n_left_out} asks for more left-out instances than the "
                            f"{n_train} training rows of {dataset}; lower it (or set it to null for all rows) or raise "
                            f"dataset.max_train")
        if self.n_test is not None and n_test and self.n_test > n_test:
            problems.append(f"selection.n_test={self.n_test} asks for more test instances than the {n_test} test rows "
                            f"of {dataset}; lower it (or set it to null) or raise dataset.max_test")
        return problems


def read_index_file(path: str | Path) -> list[int]:
    """The row indices listed in `path`, in the file's order (repeats kept; see
    :func:`left_out_from_file`): a JSON list of integers (or an object with a
    `left_out_indices` list), or a 1-D integer tensor / list saved with `torch.save` (the
    authors' index files), read with `torch.load(weights_only=True)`, which refuses anything but
    tensors and plain containers, so no code in the file can run."""
    path = Path(path).expanduser()
    fix = "write the indices as a JSON list of integers, e.g. [0, 9, 18]"
    if not path.is_file():
        raise ConfigError(f"selection.left_out_file={path} does not exist; point it at a file of training-row indices "
                          f"({fix})")
    if path.suffix.lower() == ".json":
        try:
            values = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"selection.left_out_file={path} is not valid JSON ({err}); {fix}") from err
        if isinstance(values, dict):
            values = values.get("left_out_indices")
    else:
        try:
            values = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises pickle / runtime errors of several types here
            raise ConfigError(f"selection.left_out_file={path} cannot be read as a torch tensor file with "
                              f"weights_only=True ({type(err).__name__}: {str(err).splitlines()[0][:200]}); {fix} "
                              f"and give it a .json suffix") from err
    if isinstance(values, torch.Tensor):
        integer = not values.is_floating_point() and not values.is_complex() and values.dtype != torch.bool
        if values.ndim != 1 or not integer:
            raise ConfigError(f"selection.left_out_file={path} holds a tensor of shape {tuple(values.shape)} and dtype "
                              f"{values.dtype}; expected a 1-D tensor of integer row indices")
        values = values.tolist()
    if not isinstance(values, list) or not values:
        raise ConfigError(f"selection.left_out_file={path} holds {type(values).__name__}, not a non-empty list of row "
                          f"indices; {fix}")
    bad = next((v for v in values if isinstance(v, bool) or not isinstance(v, int)), None)
    if bad is not None:
        raise ConfigError(f"selection.left_out_file={path}: entry {bad!r} ({type(bad).__name__}) is not an integer "
                          f"row index; {fix}")
    return values


def left_out_from_file(path: str | Path, n_train: int) -> tuple[list[int], dict[str, Any]]:
    """The left-out instances listed in `path` and what to record about the file (its path,
    SHA-256, entry count, repeats dropped). A repeated index is kept once, at its first
    position, with a warning: attributing an instance twice would only duplicate its column.
    Indices must lie in [0, n_train) (the training split as loaded, after `dataset.max_train`)."""
    listed = read_index_file(path)
    unique = list(dict.fromkeys(listed))
    if len(unique) < len(listed):
        log.warning("selection.left_out_file=%s lists %d indices, %d of them more than once; each is left out once "
                    "(at its first position)", path, len(listed), len(listed) - len(unique))
    outside = [i for i in unique if not 0 <= i < n_train]
    if outside:
        raise ConfigError(f"selection.left_out_file={path}: {len(outside)} indices lie outside 0..{n_train - 1} (the "
                          f"{n_train} training rows), e.g. {outside[0]}; the file must index the training split as "
                          f"loaded (after dataset.max_train and the dataset's own split)")
    record = {"path": str(path), "sha256": file_sha256(path), "n_entries": len(listed),
              "n_repeats_dropped": len(listed) - len(unique)}
    return unique, record


def every_kth(n: int, k: int) -> list[int]:
    """Rows 0, k, 2k, ... below n (the paper's regression runs leave out every 9th / 7th row)."""
    return list(range(0, n, k))


def left_out_indices(settings: SelectionSettings, data: DataBundle) -> tuple[list[int], dict[str, Any] | None]:
    """The left-out training instances by the settings' rule, and the record of the index file
    if one was read: `left_out_file` (its indices, the first n_left_out of them), else
    `left_out_every` (rows 0, k, 2k, ...), else a seeded random choice, stratified by class
    when `stratify` is set and the task has classes."""
    n_train, count = len(data.train), settings.n_left_out
    what = "left-out training instances (selection.n_left_out)"
    record = None
    if settings.left_out_file is not None:
        listed, record = left_out_from_file(settings.left_out_file, n_train)
        rows, source = listed, f"selection.left_out_file={settings.left_out_file} ({len(listed)} distinct indices)"
    elif settings.left_out_every is not None:
        rows = every_kth(n_train, settings.left_out_every)
        source = f"selection.left_out_every={settings.left_out_every} ({len(rows)} of the {n_train} training rows)"
    else:
        labels = data.tensors("train")[1] if settings.stratify and data.task == "classification" else None
        return choose_indices(n_train, count, settings.seed, labels=labels, stratify=labels is not None,
                              what=what), None
    if count is not None and count > len(rows):
        raise ConfigError(f"selection.n_left_out={count} asks for more left-out instances than {source} gives; "
                          f"lower it, or set it to null to take all of them")
    if count is not None and count < len(rows):
        log.info("left out: the first %d of %s", count, source)
    return rows[:count] if count is not None else rows, record


def choose_indices(n: int, k: int | None, seed: int, labels: torch.Tensor | None = None,
                   stratify: bool = False, what: str = "instances") -> list[int]:
    """`k` distinct indices out of `n`, sorted, chosen with `np.random.default_rng(seed)`.

    With `stratify`, classes are represented in proportion to their frequency (largest
    remainders), which keeps a small left-out set from missing a class. `k=None` = all.
    """
    if k is None or k == n:
        return list(range(n))
    if k <= 0:
        raise ValueError(f"number of {what} must be positive, got {k}")
    if k > n:
        raise ValueError(f"asked for {k} {what} but only {n} exist; lower the count or use more data")
    rng = np.random.default_rng(seed)
    if not stratify or labels is None:
        return sorted(rng.choice(n, size=k, replace=False).tolist())
    labels_np = labels.numpy()
    classes, counts = np.unique(labels_np, return_counts=True)
    quota = counts / n * k
    take = np.floor(quota).astype(int)
    for i in np.argsort(-(quota - take))[: k - take.sum()]:
        take[i] += 1
    chosen: list[int] = []
    for c, t in zip(classes, take):
        members = np.flatnonzero(labels_np == c)
        chosen += rng.choice(members, size=int(t), replace=False).tolist()
    return sorted(int(i) for i in chosen)


def first_indices(n: int, k: int | None, what: str = "instances") -> list[int]:
    """The first `k` indices (the paper evaluates the first 100 test instances)."""
    if k is None:
        return list(range(n))
    if k <= 0 or k > n:
        raise ValueError(f"number of {what} must be in 1..{n}, got {k}")
    return list(range(k))


def validate_indices(indices, n: int, what: str, source: str) -> list[int]:
    """Check a recorded list of row indices before it is used to index data: integers (not
    bools, not floats), each in [0, n), none repeated. A negative index would silently mean a
    row counted from the end and a repeated one would count an instance twice, so both are
    refused. Returns the indices as a list of ints; raises ValueError naming the first
    offending index, `what` they select and the `source` file."""
    fix = (f"restore {source} as train.py wrote it, or retrain to write a fresh one: "
           f"`python train.py <same overrides> train.overwrite=true`")
    if isinstance(n, bool) or not isinstance(n, int):
        raise ValueError(f"{source} does not record how many rows its {what} index into (got {n!r}); {fix}")
    if not isinstance(indices, (list, tuple)):
        raise ValueError(f"{what} in {source} must be a list of row indices, got {type(indices).__name__}; {fix}")
    seen: set[int] = set()
    for pos, i in enumerate(indices):
        if isinstance(i, bool) or not isinstance(i, int):
            raise ValueError(f"{what} in {source}: entry {pos} is {i!r} ({type(i).__name__}), not an integer row "
                             f"index; {fix}")
        if not 0 <= i < n:
            raise ValueError(f"{what} in {source}: index {i} (entry {pos}) is outside 0..{n - 1} (the data has "
                             f"{n} rows); {fix}")
        if i in seen:
            raise ValueError(f"{what} in {source}: index {i} appears twice (entry {pos}); each instance may be "
                             f"listed once; {fix}")
        seen.add(i)
    return list(indices)


def validate_selection(selection: dict, n_train: int, n_test: int, source) -> None:
    """Both index lists of a selection (`selection.json`): left-out training instances in
    [0, n_train), evaluated test instances in [0, n_test); see :func:`validate_indices`."""
    for key, n, what in (("left_out_indices", n_train, "left-out training indices"),
                         ("test_indices", n_test, "evaluated test indices")):
        if key not in selection:
            raise ValueError(f"{source} has no {key!r}; retrain with `python train.py <same overrides> "
                             f"train.overwrite=true` to write a complete selection")
        validate_indices(selection[key], n, what, str(source))
