"""Diagnostics of the gold standard beside the main comparison: what eq. 17's adjustment changes
(adjusted against unadjusted), how far further training moves the parameters, for
classification how much of an attribution is class structure, and how it agrees with its
sibling gold standards (another estimator or removal). Tidy DataFrames, one row per
number, for CSV, figures and W&B alike.

Shapes at the boundaries: method scores [n_test, n_left_out]; gold-standard attributions
[n_checkpoints, n_test, n_left_out]; labels y_left_out [n_left_out], y_test [n_test].
"""

from __future__ import annotations

import math

import pandas as pd
import torch

from tda.evaluation.curves import CURVE_COLUMNS, curve_rows
from tda.evaluation.metrics import METRICS, mean_and_se, rowwise_cosine
from tda.further_training.attribution import GoldStandard

# ------------------------------------------------------------------ adjusted vs unadjusted
ADJUSTMENT_COLUMNS = ["method", "metric", "adjusted", "checkpoint", "x", "x_name", "mean", "se", "n", "n_skipped"]


def adjustment_curves(gold: GoldStandard, scores: dict[str, torch.Tensor]) -> pd.DataFrame:
    """One row per (method, metric, adjusted, checkpoint): mean and SE over test instances of
    the similarity between the method's scores and the UNcentred gold standard, adjusted
    (eq. 17: loss(D∖j) − loss(D), docs/method.md §2.3) or not (loss(D∖j) − loss(θᶠ)).
    Uncentred because centring removes the difference: the two differ by a shift per test
    instance, checkpoint and seed that is the same for every left-out instance."""
    x_name, xs = gold.checkpoint_axis()
    rows = []
    for adjusted in (True, False):
        target = gold.attribution(center=False, adjust=adjusted)
        for name, metric, t, mean, se, n, skipped in curve_rows(target, scores):
            rows.append([name, metric, adjusted, t, xs[t], x_name, mean, se, n, skipped])
    return pd.DataFrame(rows, columns=ADJUSTMENT_COLUMNS)


def adjustment_summary(adjustment: pd.DataFrame) -> pd.DataFrame:
    """Per method and metric: the similarity with the adjusted and the unadjusted gold standard
    at the last checkpoint and at each one's peak over checkpoints."""
    rows = []
    for (method, metric), g in adjustment.groupby(["method", "metric"], sort=False):
        row = {"method": method, "metric": metric}
        for adjusted, word in ((True, "adjusted"), (False, "unadjusted")):
            c = g[g.adjusted == adjusted].sort_values("checkpoint")
            row[f"{word}_last"] = float(c["mean"].iloc[-1])
            row[f"{word}_peak"] = float(c["mean"].max()) if c["mean"].notna().any() else math.nan
        rows.append(row)
    return pd.DataFrame(rows, columns=["method", "metric", "adjusted_last", "unadjusted_last", "adjusted_peak",
                                       "unadjusted_peak"])


# ------------------------------------------------------------------ distance from the start
DISTANCE_COLUMNS = ["checkpoint", "x", "x_name", "mean", "se", "n_seeds"]


def distance_from_start(gold: GoldStandard) -> pd.DataFrame | None:
    """Per checkpoint, ‖θ_t − θ_start‖ of the full-data run (θ_start: the final model θᶠ, or
    for a retraining gold standard the initial weights), mean and SE over seeds; None when the
    gold standard does not record it (computed before the distance was recorded)."""
    dist = gold.distance_from_start  # [n_checkpoints, n_seeds] float64
    if dist is None:
        return None
    if tuple(dist.shape) != (gold.n_checkpoints, len(gold.seeds)):
        raise ValueError(f"the gold standard's distance_from_start has shape {tuple(dist.shape)}, expected "
                         f"[n_checkpoints, n_seeds] = {(gold.n_checkpoints, len(gold.seeds))}")
    x_name, xs = gold.checkpoint_axis()
    rows = [[t, xs[t], x_name, *mean_and_se(dist[t])[:3]] for t in range(gold.n_checkpoints)]
    return pd.DataFrame(rows, columns=DISTANCE_COLUMNS)


# ------------------------------------------------------------------ class structure
CLASS_COLUMNS = ["source", "centered", "checkpoint", "x", "x_name", "same_class", "same_class_se", "other_class",
                 "other_class_se", "difference", "difference_se", "cosine_same_class", "cosine_same_class_se", "n",
                 "n_undefined"]
GOLD = "gold standard"


def same_class(y_left_out: torch.Tensor, y_test: torch.Tensor) -> torch.Tensor:
    """[n_test, n_left_out] bool: whether left-out instance j has test instance z's class."""
    return y_test.reshape(-1, 1) == y_left_out.reshape(1, -1)


def class_structure_rows(s: torch.Tensor, same: torch.Tensor) -> list[float | int]:
    """For scores s [n_test, n_left_out] and the same-class mask [n_test, n_left_out]: mean and
    SE over test instances of (the mean score of the left-out instances of z's own class; of
    the other classes; their difference; the cosine, both centred over the left-out
    instances, of z's scores with the same-class indicator), then the number of test
    instances used for the cosine and the number where it is undefined (z's class is held by
    no left-out instance or by all of them, or z's scores are constant)."""
    s, ind = s.double(), same.double()
    n_same, n_other = ind.sum(-1), (1 - ind).sum(-1)
    nan = torch.full_like(n_same, math.nan)
    own = torch.where(n_same > 0, (s * ind).sum(-1) / n_same.clamp_min(1), nan)
    other = torch.where(n_other > 0, (s * (1 - ind)).sum(-1) / n_other.clamp_min(1), nan)
    cos = rowwise_cosine(s - s.mean(-1, keepdim=True), ind - ind.mean(-1, keepdim=True))  # NaN: a constant vector
    c_mean, c_se, n, undefined = mean_and_se(cos)
    return [*mean_and_se(own)[:2], *mean_and_se(other)[:2], *mean_and_se(own - other)[:2], c_mean, c_se, n,
            undefined]


def class_structure(gold: GoldStandard, scores: dict[str, torch.Tensor], y_left_out: torch.Tensor,
                    y_test: torch.Tensor, centering: tuple[bool, ...] = (True, False)) -> pd.DataFrame:
    """How much of each attribution is "same class helps / hurts": per checkpoint for the gold
    standard (per centring) and once for every method (checkpoint −1: methods do not depend
    on it), the mean over test instances of the mean score of left-out instances of the test
    instance's own class and of other classes, and the centred cosine of the scores with the
    same-class indicator [y_j == y_z] (:func:`class_structure_rows`). Classification only."""
    n_test, n_left_out = len(gold.meta["test_indices"]), len(gold.meta["left_out_indices"])
    if tuple(y_left_out.shape) != (n_left_out,) or tuple(y_test.shape) != (n_test,):
        raise ValueError(f"labels of shape {tuple(y_left_out.shape)} (left-out) and {tuple(y_test.shape)} (test) do "
                         f"not fit the gold standard's {n_left_out} left-out and {n_test} test instances")
    same = same_class(y_left_out, y_test)
    x_name, xs = gold.checkpoint_axis()
    rows = []
    for centered in centering:
        target = gold.attribution(center=centered)
        for t in range(gold.n_checkpoints):
            rows.append([GOLD, centered, t, xs[t], x_name, *class_structure_rows(target[t], same)])
    for name, s in scores.items():
        rows.append([name, None, -1, math.nan, x_name, *class_structure_rows(s, same)])
    return pd.DataFrame(rows, columns=CLASS_COLUMNS)


# ------------------------------------------------------------------ further training vs retraining
def further_training_vs_retraining(retraining: GoldStandard, further: dict[str, GoldStandard],
                                   centering: tuple[bool, ...] = (True, False)) -> pd.DataFrame:
    """The paper's Figure 11 comparison: per further-training gold standard (label -> gold
    standard) and each of its checkpoints, the similarity of its attribution [n_test, n_left_out]
    with the retraining gold standard at its LAST checkpoint (the models retrained in full), mean
    and SE over test instances; centred (eq. 13) on both sides or on neither. Rows as
    `similarity_curves`, the further-training gold standard in the `method` column."""
    rows = []
    for centered in centering:
        target = retraining.attribution(center=centered)[-1]  # [n_test, n_left_out]
        for label, gold in further.items():
            x_name, xs = gold.checkpoint_axis()
            curve = gold.attribution(center=centered)  # [T, n_test, n_left_out]
            for metric, fn in METRICS.items():
                for t in range(curve.shape[0]):
                    mean, se, n, skipped = mean_and_se(fn(curve[t], target))
                    rows.append([label, metric, centered, t, xs[t], x_name, mean, se, n, skipped])
    return pd.DataFrame(rows, columns=CURVE_COLUMNS)


# ------------------------------------------------------------------ gold standard vs gold standard
GOLD_AGREEMENT_COLUMNS = ["gold", "sibling", "sibling_key", "metric", "centered", "checkpoint", "x", "x_name", "mean",
                          "se", "n", "n_skipped"]


def rowwise_norm_ratio(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖a_z‖ / ‖b_z‖ per row (NaN where ‖b_z‖ = 0): 1 when two attributions have the same scale."""
    a, b = a.double(), b.double()
    den = b.norm(dim=-1)
    return torch.where(den > 0, a.norm(dim=-1) / den.clamp_min(1e-300), torch.full_like(den, math.nan))


def gold_agreement(gold: GoldStandard, label: str, siblings: dict[str, tuple[str, GoldStandard]],
                   centering: tuple[bool, ...] = (True, False)) -> pd.DataFrame:
    """Per checkpoint, cosine, Spearman and norm ratio (mean and SE over test instances) between
    the gold standard `gold` (called `label`) and each sibling gold standard of the same final
    model, selection and further-training settings but another estimator / removal
    (`siblings`: label -> (key, GoldStandard)): where the derivative and the difference gold
    standards agree, the linearisation holds."""
    x_name, xs = gold.checkpoint_axis()
    metrics = {**METRICS, "norm_ratio": rowwise_norm_ratio}
    rows = []
    for centered in centering:
        a = gold.attribution(center=centered)
        for name, (key, other) in siblings.items():
            b = other.attribution(center=centered)
            if a.shape != b.shape:
                raise ValueError(f"the gold standard {key} ({name}) has shape {tuple(b.shape)}, this one "
                                 f"{tuple(a.shape)}; they cannot be compared")
            for metric, fn in metrics.items():
                for t in range(a.shape[0]):
                    rows.append([label, name, key, metric, centered, t, xs[t], x_name, *mean_and_se(fn(a[t], b[t]))])
    return pd.DataFrame(rows, columns=GOLD_AGREEMENT_COLUMNS)
