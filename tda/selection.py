"""Seeded, recorded choice of the left-out training instances and evaluated test instances,
and its settings (the `selection` section)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from tda.sections import Checks, Section, setting


@dataclass
class SelectionSettings(Section):
    """`selection`: which instances are attributed and evaluated (recorded in selection.json
    and part of the run directory's key)."""

    PATH = "selection"
    n_left_out: int | None = setting(40, "training instances attributed (left out one at a time)",
                                     "null attributes every training row")
    n_test: int | None = setting(40, "test instances evaluated", "null evaluates every test instance")
    seed: int = setting(0, "seed of the choice")
    stratify: bool = setting(True, "left-out instances stratified by label")
    test: Literal["first", "random"] = setting("first", "which test instances (the paper evaluates the first 100)")

    def check(self, c: Checks) -> None:
        c.positive("n_left_out")
        c.positive("n_test")
        c.non_negative("seed")

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
