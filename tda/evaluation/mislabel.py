"""Mislabel detection (docs/evaluation.md, "Mislabel detection"): how well each method's
self-influence, ranked from the highest, finds the training labels that label noise flipped.

Two measures, both from the ranking alone:

- **AUC**: the area under the ROC curve of inspecting the training instances in the order of the
  ranking, a flipped instance counting as a positive — dattri's `mislabel_detection_auc` (the
  trapezoid over every number of instances inspected). Ties are broken in expectation (a group of
  tied scores is inspected as one, its positives spread evenly over it), so the AUC is the
  Mann–Whitney probability that a flipped instance outranks a clean one, ties counting half
  (scikit-learn's `roc_auc_score`); without ties it equals dattri's exactly. 0.5 is a random order.
- **found at p**: the fraction of the flipped instances among the first ⌊p · n_train⌋ inspected,
  p = 5 %, 10 %, 20 % (kronfluence reports 80 % found at 10 %). A random order finds p.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from tda.evaluation.metrics import average_ranks, rowwise_spearman

INSPECTED = (0.05, 0.10, 0.20)  # fractions of the training set inspected: the found_at_<percent> columns
CURVE_POINTS = 400  # the detection curve is written at about this many numbers of instances inspected


def flipped_mask(label_noise: dict | None, n_train: int) -> torch.Tensor:
    """[n_train] bool: the training rows whose labels were flipped (selection.json's `label_noise`)."""
    mask = torch.zeros(n_train, dtype=torch.bool)
    if label_noise:
        mask[torch.as_tensor(label_noise["flipped_indices"], dtype=torch.long)] = True
    return mask


def detection_auc(scores: torch.Tensor, flipped: torch.Tensor) -> float:
    """AUC of ranking the flipped instances first by `scores` [n] (higher = inspected earlier);
    flipped [n] bool. Ties count half (the expected AUC over the orders of tied instances)."""
    positives, n = int(flipped.sum()), len(flipped)
    if positives in (0, n):
        raise ValueError("the AUC needs both flipped and clean instances")
    ranks = average_ranks(scores.double())
    return float((ranks[flipped].sum() - positives * (positives + 1) / 2) / (positives * (n - positives)))


def found_curve(scores: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
    """[n + 1] float64: the expected number of flipped instances among the first k inspected in the
    order of `scores` (highest first), k = 0..n, tied instances inspected in a random order."""
    order = torch.argsort(scores.double(), descending=True, stable=True)
    s, hit = scores.double()[order], flipped[order].double()
    new_group = torch.ones(len(s), dtype=torch.bool)
    new_group[1:] = s[1:] != s[:-1]
    group = new_group.long().cumsum(0) - 1
    n_groups = int(group[-1]) + 1 if len(s) else 0
    size = torch.zeros(n_groups, dtype=torch.float64).scatter_add_(0, group, torch.ones_like(hit))
    hits = torch.zeros(n_groups, dtype=torch.float64).scatter_add_(0, group, hit)
    start = torch.cumsum(size, 0) - size  # first position of each group
    before = torch.cumsum(hits, 0) - hits  # flipped instances in the groups before it
    k = torch.arange(1, len(s) + 1, dtype=torch.float64)
    found = before[group] + (k - start[group]) * hits[group] / size[group]
    return torch.cat([torch.zeros(1, dtype=torch.float64), found])


def inspected_count(fraction: float, n: int) -> int:
    """⌊fraction · n⌋ instances (at least 1)."""
    return max(1, math.floor(fraction * n + 1e-9))


def mislabel_table(self_influence: dict[str, torch.Tensor], flipped: torch.Tensor,
                   records: dict[str, dict]) -> pd.DataFrame:
    """One row per source of self-influence (a method, the loss baseline, the gold standard's
    self-effect): auc, found_at_<p> for p in INSPECTED, the sizes, and the seconds it took."""
    n, positives = len(flipped), int(flipped.sum())
    rows = []
    for label, scores in self_influence.items():
        curve = found_curve(scores, flipped)
        row = {"method": label, "auc": detection_auc(scores, flipped)}
        row |= {found_column(p): float(curve[inspected_count(p, n)]) / positives for p in INSPECTED}
        row |= {"n_train": n, "n_flipped": positives, "seconds": records.get(label, {}).get("seconds", math.nan)}
        rows.append(row)
    return pd.DataFrame(rows).sort_values("auc", ascending=False, kind="stable").reset_index(drop=True)


def found_column(fraction: float) -> str:
    """found_at_10 for 10 % of the training set inspected."""
    return f"found_at_{round(fraction * 100):g}"


def detection_curves(self_influence: dict[str, torch.Tensor], flipped: torch.Tensor,
                     points: int = CURVE_POINTS) -> pd.DataFrame:
    """Long table (method, inspected, found): the fraction of the training set inspected and of the
    flipped instances found, at about `points` numbers of instances inspected (every one for a
    small training set), for every source and for the random order (`random`) and the perfect
    one (`oracle`)."""
    n, positives = len(flipped), int(flipped.sum())
    ks = np.unique(np.linspace(0, n, min(points, n) + 1).round().astype(int))
    frames = []
    for label, scores in self_influence.items():
        found = found_curve(scores, flipped)[torch.as_tensor(ks)].numpy()
        frames.append(pd.DataFrame({"method": label, "inspected": ks / n, "found": found / positives}))
    for label, found in (("random", ks / n), ("oracle", np.minimum(ks, positives) / positives)):
        frames.append(pd.DataFrame({"method": label, "inspected": ks / n, "found": found}))
    return pd.concat(frames, ignore_index=True)


def self_influence_agreement(self_influence: dict[str, torch.Tensor]) -> pd.DataFrame:
    """Spearman rank correlation of every pair of sources' self-influence over the training set:
    (method_a, method_b, spearman); NaN (undefined) where a source is constant
    (:func:`constant_sources`)."""
    labels = list(self_influence)
    rows = [{"method_a": a, "method_b": b,
             "spearman": float(rowwise_spearman(self_influence[a][None], self_influence[b][None])[0])}
            for i, a in enumerate(labels) for b in labels[i + 1:]]
    return pd.DataFrame(rows, columns=["method_a", "method_b", "spearman"])


def constant_sources(self_influence: dict[str, torch.Tensor]) -> dict[str, str]:
    """The sources whose self-influence is the same for every training instance, each with what
    that means: no order to inspect the training set in (every AUC is 0.5 and every found-at p
    is p: the expectation over the orders of ties, not a ranking), and no rank correlation."""
    return {label: (f"{label}: the self-influence is constant over the training set: it ranks nothing, so its AUC "
                    f"(0.5) and found-at fractions (= the fraction inspected) are those of a random order, and its "
                    f"Spearman with every other source is undefined")
            for label, s in self_influence.items() if bool((s == s[0]).all())}
