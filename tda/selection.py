"""Seeded, recorded choice of the left-out training instances and evaluated test instances."""

from __future__ import annotations

import numpy as np
import torch


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
