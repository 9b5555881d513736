"""The analyses of docs/method.md §4 that compare scores with the gold standard's curves, as tidy
DataFrames (one row per number), so that the same rows go to CSV, to the figures and to W&B:
similarity curves, peaks against the seeds averaged, the split-half reliability, sorted-score
profiles, method vs method and the summary. (The top-k analyses: tda.evaluation.top_k; the gold
standard's own diagnostics: tda.evaluation.diagnostics.)

Shapes at the boundaries: method scores are [n_test, n_left_out]; a gold-standard
attribution is [n_checkpoints, n_test, n_left_out]; raw per-seed differences are
[n_checkpoints, n_test, n_left_out, n_seeds] (the `diff` of a GoldStandard).
"""

from __future__ import annotations

import math
from typing import Callable

import pandas as pd
import torch

from tda.config import ConfigError
from tda.evaluation.metrics import METRICS, mean_and_se
from tda.further_training.attribution import FURTHER_TRAIN_COMMAND, GoldStandard
from tda.scores import require_finite_scores

CURVE_COLUMNS = ["method", "metric", "centered", "checkpoint", "x", "x_name", "mean", "se", "n", "n_skipped"]


def check_scores_shape(name: str, s: torch.Tensor, target: torch.Tensor) -> None:
    """Refuse method scores [n_test, n_left_out] that do not fit the gold-standard attribution
    `target` [T, n_test, n_left_out], or that hold NaN/inf (tda.scores.require_finite_scores)."""
    if tuple(s.shape) != tuple(target.shape[1:]):
        raise ValueError(f"scores of {name} have shape {tuple(s.shape)} but the gold standard has "
                         f"[n_test, n_left_out] = {tuple(target.shape[1:])}; they were computed for a different "
                         f"selection")
    require_finite_scores(name, s)


def curve_rows(target: torch.Tensor, scores: dict[str, torch.Tensor]
               ) -> list[tuple[str, str, int, float, float, int, int]]:
    """(method, metric, checkpoint, mean, se, n, n_skipped) for a gold attribution `target`
    [T, n_test, n_left_out] and method scores [n_test, n_left_out]; both must be finite
    (NaN is reserved for a metric that is undefined on a constant vector)."""
    if not bool(torch.isfinite(target).all()):
        raise ValueError(f"the gold-standard attribution holds {int((~torch.isfinite(target)).sum())} NaN/inf "
                         f"entries; delete the gold standard's diverged seed files and re-run {FURTHER_TRAIN_COMMAND}")
    rows = []
    for name, s in scores.items():
        check_scores_shape(name, s, target)
        for metric, fn in METRICS.items():
            for t in range(target.shape[0]):
                rows.append((name, metric, t, *mean_and_se(fn(s, target[t]))))
    return rows


def similarity_curves(gold: GoldStandard, scores: dict[str, torch.Tensor],
                      centering: tuple[bool, ...] = (True, False)) -> pd.DataFrame:
    """One row per (method, metric, centring, checkpoint): mean and SE over test instances of
    the per-test-instance similarity. Method scores are never centred, only the gold
    standard (docs/method.md §2). Undefined values (constant vectors) are skipped and counted."""
    x_name, xs = gold.checkpoint_axis()
    rows = []
    for centered in centering:
        target = gold.attribution(center=centered)  # [T, n_test, n_left_out]
        for name, metric, t, mean, se, n, skipped in curve_rows(target, scores):
            rows.append([name, metric, centered, t, xs[t], x_name, mean, se, n, skipped])
    return pd.DataFrame(rows, columns=CURVE_COLUMNS)


def gold_attribution(gold: GoldStandard) -> Callable[[bool, list[int]], torch.Tensor]:
    """attribution(center, seed_positions) -> [T, n_test, n_left_out] of `gold` over those seeds:
    what :func:`seed_window_peaks` and :func:`split_half_reliability` take."""
    return lambda center, seeds: gold.attribution(center=center, seeds=seeds)


# ------------------------------------------------------------------ seeds averaged
def seed_windows(n_seeds: int, ks: tuple[int, ...] | list[int]) -> dict[int, list[list[int]]]:
    """Non-overlapping windows of K consecutive seed positions, for every K that fits at
    least once (docs/method.md §4); leftover seeds that do not fill a window are not used."""
    return {int(k): [list(range(i * k, (i + 1) * k)) for i in range(n_seeds // k)]
            for k in sorted(set(int(k) for k in ks)) if 0 < k <= n_seeds}


# The two definitions of "peak similarity with K seeds averaged", the authors' first: the peak over
# checkpoints of the window-averaged curve, and the mean over windows of each window's own peak
# (never below the first: a max of means is at most the mean of maxes).
PEAK_DEFINITIONS = ("peak_of_mean_curve", "mean_of_window_peaks")
PEAK_COLUMNS = ["method", "metric", "centered", "definition", "n_seeds_averaged", "n_windows", "peak_mean", "peak_se",
                "n_windows_undefined", "peak_checkpoints"]


def seed_window_peaks(attribution: Callable[[bool, list[int]], torch.Tensor], n_seeds: int,
                      scores: dict[str, torch.Tensor], ks: tuple[int, ...] | list[int],
                      centering: tuple[bool, ...] = (True, False)) -> pd.DataFrame:
    """Peak similarity over checkpoints against the number of seeds K averaged in the gold
    standard, under both PEAK_DEFINITIONS. For each non-overlapping window of K seeds the
    similarity curve (mean over test instances per checkpoint) is computed; then

    - `peak_of_mean_curve` (the authors'): the curves averaged over the windows, then the peak
      over checkpoints of that average; SE = the windows' spread at the peak checkpoint;
    - `mean_of_window_peaks`: each window's own peak, then their mean and SE over windows.

    `attribution(center, seed_positions)` returns [T, n_test, n_left_out] for those seeds
    (GoldStandard.attribution). `peak_checkpoints`: the checkpoint of the peak (per window for
    the second definition, space-separated; `undefined` where the curve is undefined at every
    checkpoint, never a checkpoint by default)."""
    rows = []
    for centered in centering:
        for k, windows in seed_windows(n_seeds, ks).items():
            curves: dict[tuple[str, str], list[list[float]]] = {}  # per (method, metric): [n_windows][T]
            for w in windows:
                for name, metric, t, mean, *_ in curve_rows(attribution(centered, w), scores):
                    per_window = curves.setdefault((name, metric), [])
                    if t == 0:
                        per_window.append([])
                    per_window[-1].append(mean)
            for (name, metric), per_window in curves.items():
                curve = torch.tensor(per_window, dtype=torch.float64)  # [n_windows, T]
                for definition in PEAK_DEFINITIONS:
                    rows.append([name, metric, centered, definition, k, len(windows),
                                 *_peak(curve, definition)])
    return pd.DataFrame(rows, columns=PEAK_COLUMNS)


def _peak(curve: torch.Tensor, definition: str) -> tuple[float, float, int, str]:
    """(peak, SE, windows undefined, peak checkpoint(s)) of window curves [n_windows, T] (NaN:
    undefined at that checkpoint) under one of PEAK_DEFINITIONS."""
    if definition == "peak_of_mean_curve":
        ok = ~torch.isnan(curve)
        mean_curve = torch.where(ok, curve, 0.0).sum(0) / ok.sum(0)  # NaN where every window is undefined
        if bool(torch.isnan(mean_curve).all()):
            return math.nan, math.nan, len(curve), "undefined"
        t = int(torch.where(torch.isnan(mean_curve), -math.inf, mean_curve).argmax())
        _, se, _, skipped = mean_and_se(curve[:, t])
        return float(mean_curve[t]), se, skipped, str(t)
    peaks, where = [], []
    for window in curve:
        finite = [(float(m), t) for t, m in enumerate(window) if not math.isnan(m)]
        peak, t = max(finite) if finite else (math.nan, "undefined")
        peaks.append(peak)
        where.append(str(t))
    mean, se, _, skipped = mean_and_se(torch.tensor(peaks, dtype=torch.float64))
    return mean, se, skipped, " ".join(where)


# ------------------------------------------------------------------ gold standard reliability
RELIABILITY_COLUMNS = ["metric", "centered", "checkpoint", "x", "x_name", "mean", "se", "n", "n_skipped",
                       "seeds_per_half", "projected_seeds", "projected"]


def split_half_reliability(attribution: Callable[[bool, list[int]], torch.Tensor], n_seeds: int,
                           x_name: str, xs: list[float], centering: tuple[bool, ...] = (True, False)) -> pd.DataFrame:
    """Per checkpoint, the similarity between the gold standard averaged over the first k =
    n_seeds // 2 seeds and over the next k (disjoint; with an odd n_seeds the last seed is
    unused), mean and SE over test instances: `seeds_per_half` = k ("k vs k seeds").

    This is the agreement of two gold standards of k seeds each: a ceiling on how well any
    method can agree with a gold standard that noisy. `projected` is its Spearman–Brown
    projection to `projected_seeds` = n_seeds, the gold standard every method is scored
    against: with m = n_seeds / k, sqrt(m·r / (1 + (m − 1)·r)) — the expected agreement of the
    noise-free attribution with a gold standard of all n_seeds seeds (classical test theory;
    only defined for r > 0). An odd n_seeds leaves one seed out of the halves but not of the
    projection."""
    if n_seeds < 2:
        return pd.DataFrame(columns=RELIABILITY_COLUMNS)
    half = n_seeds // 2
    m = n_seeds / half  # the scored gold standard holds m times a half's seeds
    rows = []
    for centered in centering:
        a = attribution(centered, list(range(half)))
        b = attribution(centered, list(range(half, 2 * half)))
        for metric, fn in METRICS.items():
            for t in range(a.shape[0]):
                mean, se, n, skipped = mean_and_se(fn(a[t], b[t]))
                projected = math.sqrt(m * mean / (1 + (m - 1) * mean)) if mean > 0 else math.nan
                rows.append([metric, centered, t, xs[t], x_name, mean, se, n, skipped, half, n_seeds, projected])
    return pd.DataFrame(rows, columns=RELIABILITY_COLUMNS)


def split_half_label(reliability: pd.DataFrame) -> str:
    """`k vs k seeds` of a split_half_reliability table."""
    k = int(reliability.seeds_per_half.iloc[0])
    return f"{k} vs {k} seeds"


# ------------------------------------------------------------------ sorted scores
def sorted_profile(s: torch.Tensor) -> torch.Tensor:
    """[n_test, n_left_out] -> [n_left_out]: each test instance's scores sorted in
    descending order, averaged over test instances, L2-normalised (docs/method.md §4)."""
    prof = s.double().sort(dim=-1, descending=True).values.mean(0)
    norm = prof.norm()
    return prof / norm if norm > 0 else prof


def sorted_scores(gold: GoldStandard, scores: dict[str, torch.Tensor], checkpoints: list[int],
                  centering: tuple[bool, ...] = (True, False)) -> pd.DataFrame:
    """Rows (source, centered, checkpoint, x, rank, value): the sorted-score profile of the
    gold standard at each chosen checkpoint and of every method (checkpoint −1: methods do
    not depend on it). Centring only applies to the gold standard."""
    x_name, xs = gold.checkpoint_axis()
    rows = []
    for centered in centering:
        target = gold.attribution(center=centered)
        for t in checkpoints:
            for r, v in enumerate(sorted_profile(target[t]).tolist()):
                rows.append(["gold standard", centered, t, xs[t], r + 1, v])
    for name, s in scores.items():
        for r, v in enumerate(sorted_profile(s).tolist()):
            rows.append([name, None, -1, math.nan, r + 1, v])
    return pd.DataFrame(rows, columns=["source", "centered", "checkpoint", "x", "rank", "value"])


def resolve_checkpoints(requested, n_checkpoints: int) -> list[int]:
    """Checkpoint positions from config: ints (negative counts from the end) or the words
    `first`, `last`, `middle`; deduplicated in order."""
    named = {"first": 0, "last": n_checkpoints - 1, "middle": (n_checkpoints - 1) // 2}
    out = []
    for c in requested:
        t = named.get(c, c) if isinstance(c, str) else int(c)
        if not isinstance(t, int):
            raise ConfigError(f"evaluate checkpoint {c!r} is neither an integer nor one of {sorted(named)}")
        if t < 0:
            t += n_checkpoints
        if not 0 <= t < n_checkpoints:
            raise ConfigError(f"evaluate checkpoint {c} is out of range: the gold standard has {n_checkpoints} "
                              f"checkpoints")
        if t not in out:
            out.append(t)
    return out


# ------------------------------------------------------------------ method vs method
def method_agreement(scores: dict[str, torch.Tensor]) -> pd.DataFrame:
    """Every pair of methods: per-test-instance cosine and Spearman between their score
    vectors, mean and SE over test instances (the paper compares e.g. Grad-Dot and DataInf)."""
    names = list(scores)
    for name in names:
        require_finite_scores(name, scores[name])
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            for metric, fn in METRICS.items():
                rows.append([a, b, metric, *mean_and_se(fn(scores[a], scores[b]))])
    return pd.DataFrame(rows, columns=["method_a", "method_b", "metric", "mean", "se", "n", "n_skipped"])


# ------------------------------------------------------------------ summary
def summary_table(curves: pd.DataFrame, records: dict, overlap: dict[str, tuple[float, float]] | None = None,
                  by: tuple[str, ...] = ("method",), topk: dict[str, dict[str, float]] | None = None) -> pd.DataFrame:
    """Per method (and centring) of the `similarity_curves` rows: peak cosine and where it is,
    cosine and Spearman at the first and last checkpoints, Spearman values skipped as
    undefined, and the method's wall time and memory from its record (`records`: keyed by
    method label, or by (experiment, method label) when `by` = ("experiment", "method"));
    with `overlap`, each method's mean top-k overlap with the gold standard (examples.md's k);
    with `topk` (:func:`top_k_summary`), precision@k and recall at the last checkpoint. A cosine
    undefined at every checkpoint has no peak: NaN, and no peak checkpoint (<NA>)."""
    rows = []
    for keys, g in curves.groupby([*by, "centered"], sort=True):
        keys = dict(zip([*by, "centered"], keys))
        cos = g[g.metric == "cosine"].sort_values("checkpoint")
        sp = g[g.metric == "spearman"].sort_values("checkpoint")
        if cos["mean"].notna().any():
            peak = cos.loc[cos["mean"].idxmax()]
            peak_cosine, peak_checkpoint, peak_x = peak["mean"], int(peak["checkpoint"]), peak["x"]
        else:  # undefined at every checkpoint: no peak, and no checkpoint of one (not the first by default)
            peak_cosine, peak_checkpoint, peak_x = math.nan, pd.NA, math.nan
        rec = records.get(keys["method"], {}) if by == ("method",) else records.get((keys[by[0]], keys["method"]), {})
        row = keys | {"peak_cosine": peak_cosine, "peak_checkpoint": peak_checkpoint, "peak_x": peak_x,
                      "cosine_first": cos["mean"].iloc[0], "cosine_last": cos["mean"].iloc[-1],
                      "spearman_first": sp["mean"].iloc[0], "spearman_last": sp["mean"].iloc[-1],
                      "spearman_skipped": int(sp.n_skipped.sum()),
                      "seconds": rec.get("seconds", math.nan), "peak_mb": rec.get("peak_mb", math.nan)}
        if overlap is not None and keys["method"] in overlap:
            row["top_k_helpful_overlap"], row["top_k_harmful_overlap"] = overlap[keys["method"]]
        if topk is not None:
            row |= topk.get(keys["method"], {})
        rows.append(row)
    table = pd.DataFrame(rows)
    if len(table):  # whole numbers, and empty in the CSV where there is no peak
        table["peak_checkpoint"] = table["peak_checkpoint"].astype("Int64")
    return table
