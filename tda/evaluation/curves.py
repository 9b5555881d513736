"""The analyses of docs/method.md §4 as tidy DataFrames (one row per number), so that the same rows
go to CSV, to the figures and to W&B.

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
from tda.further_training.store import GoldStandard

CURVE_COLUMNS = ["method", "metric", "centered", "checkpoint", "x", "x_name", "mean", "se", "n", "n_skipped"]
DEFAULT_WINDOWS = (1, 2, 5, 10, 20, 50, 100)


def _check_shape(name: str, s: torch.Tensor, target: torch.Tensor) -> None:
    if tuple(s.shape) != tuple(target.shape[1:]):
        raise ValueError(f"scores of {name} have shape {tuple(s.shape)} but the gold standard has "
                         f"[n_test, n_left_out] = {tuple(target.shape[1:])}; they were computed for a different selection")
    check_finite_scores(name, s)


def check_finite_scores(name: str, s: torch.Tensor) -> None:
    """Refuse method scores [n_test, n_left_out] holding NaN/inf. Left in, a NaN makes the
    test instance's cosine "undefined" (silently skipped) and its ranks arbitrary (Spearman
    over garbage), so the method would be scored on a subset it did not choose."""
    bad = ~torch.isfinite(s)
    if bool(bad.any()):
        rows = bad.any(-1).nonzero().flatten().tolist()
        raise ValueError(f"scores of {name} hold {int(bad.sum())} NaN/inf entries of {s.numel()} (test positions "
                         f"{rows[:10]}{' ...' if len(rows) > 10 else ''}); the method failed numerically. Delete its "
                         f"directory under methods/ and re-run attribute.py for it with settings that keep it finite, "
                         f"or leave it deleted to evaluate the other methods")


def curve_rows(target: torch.Tensor, scores: dict[str, torch.Tensor]) -> list[tuple[str, str, int, float, float, int, int]]:
    """(method, metric, checkpoint, mean, se, n, n_skipped) for a gold attribution `target`
    [T, n_test, n_left_out] and method scores [n_test, n_left_out]; both must be finite
    (NaN is reserved for a metric that is undefined on a constant vector)."""
    if not bool(torch.isfinite(target).all()):
        raise ValueError(f"the gold-standard attribution holds {int((~torch.isfinite(target)).sum())} NaN/inf entries; "
                         f"delete the gold standard's diverged seed files and re-run attribute.py method=further_training")
    rows = []
    for name, s in scores.items():
        _check_shape(name, s, target)
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


# ------------------------------------------------------------------ seeds averaged
def seed_windows(n_seeds: int, ks: tuple[int, ...] | list[int] = DEFAULT_WINDOWS) -> dict[int, list[list[int]]]:
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
                      scores: dict[str, torch.Tensor], ks=DEFAULT_WINDOWS,
                      centering: tuple[bool, ...] = (True, False)) -> pd.DataFrame:
    """Peak similarity over checkpoints against the number of seeds K averaged in the gold
    standard, under both PEAK_DEFINITIONS. For each non-overlapping window of K seeds the
    similarity curve (mean over test instances per checkpoint) is computed; then

    - `peak_of_mean_curve` (the authors'): the curves averaged over the windows, then the peak
      over checkpoints of that average; SE = the windows' spread at the peak checkpoint;
    - `mean_of_window_peaks`: each window's own peak, then their mean and SE over windows.

    `attribution(center, seed_positions)` returns [T, n_test, n_left_out] for those seeds
    (GoldStandard.attribution). `peak_checkpoints`: the checkpoint of the peak (per window for
    the second definition, space-separated)."""
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
            return math.nan, math.nan, len(curve), "-1"
        t = int(torch.where(torch.isnan(mean_curve), -math.inf, mean_curve).argmax())
        _, se, _, skipped = mean_and_se(curve[:, t])
        return float(mean_curve[t]), se, skipped, str(t)
    peaks, where = [], []
    for window in curve:
        finite = [(float(m), t) for t, m in enumerate(window) if not math.isnan(m)]
        peak, t = max(finite) if finite else (math.nan, -1)
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
            raise ConfigError(f"evaluate checkpoint {c} is out of range: the gold standard has {n_checkpoints} checkpoints")
        if t not in out:
            out.append(t)
    return out


# ------------------------------------------------------------------ method vs method
def method_agreement(scores: dict[str, torch.Tensor]) -> pd.DataFrame:
    """Every pair of methods: per-test-instance cosine and Spearman between their score
    vectors, mean and SE over test instances (the paper compares e.g. Grad-Dot and DataInf)."""
    names = list(scores)
    for name in names:
        check_finite_scores(name, scores[name])
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            for metric, fn in METRICS.items():
                rows.append([a, b, metric, *mean_and_se(fn(scores[a], scores[b]))])
    return pd.DataFrame(rows, columns=["method_a", "method_b", "metric", "mean", "se", "n", "n_skipped"])


# ------------------------------------------------------------------ top instances
def top_instances(target: torch.Tensor, scores: dict[str, torch.Tensor], test_positions: list[int],
                  left_out_indices: list[int], test_indices: list[int], k: int) -> pd.DataFrame:
    """For each chosen test instance (position in the evaluated test set), the k most helpful
    (largest gold score) and k most harmful (smallest) left-out instances of the gold
    standard `target` [n_test, n_left_out], with every method's score and rank (1 = most
    helpful by that method) for them, and whether the method also puts them in its own top k
    (helpful) / bottom k (harmful)."""
    n = target.shape[-1]
    k = min(k, n)
    rows = []
    for p in test_positions:
        g = target[p]
        ranks = {name: _rank_desc(s[p]) for name, s in scores.items()}
        for kind, order in (("helpful", g.argsort(descending=True)), ("harmful", g.argsort())):
            for r, j in enumerate(order[:k].tolist()):
                row = {"test_position": p, "test_index": test_indices[p], "kind": kind, "rank": r + 1,
                       "left_out_position": j, "train_index": left_out_indices[j], "gold": float(g[j])}
                for name, s in scores.items():
                    mr = int(ranks[name][j])
                    row[f"{name}:score"] = float(s[p, j])
                    row[f"{name}:rank"] = mr
                    row[f"{name}:agrees"] = mr <= k if kind == "helpful" else mr > n - k
                rows.append(row)
    return pd.DataFrame(rows)


def _rank_desc(v: torch.Tensor) -> torch.Tensor:
    ranks = torch.empty(len(v), dtype=torch.long)
    ranks[v.argsort(descending=True)] = torch.arange(1, len(v) + 1)
    return ranks


def top_k_overlap(target: torch.Tensor, s: torch.Tensor, k: int) -> tuple[float, float]:
    """Mean over test instances of |top-k(method) ∩ top-k(gold)| / k for the most helpful
    and the most harmful k. target, s: [n_test, n_left_out]."""
    k = min(k, target.shape[-1])
    def ov(descending):
        a = target.argsort(dim=-1, descending=descending)[:, :k]
        b = s.argsort(dim=-1, descending=descending)[:, :k]
        return float(sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(a, b)) / (k * len(a)))
    return ov(True), ov(False)


# ------------------------------------------------------------------ the gold standard's top k
TOPK_COLUMNS = ["method", "kind", "k", "m", "checkpoint", "x", "x_name", "precision", "precision_se", "recall",
                "recall_se", "n"]
DEFAULT_TOP_K = (10, 100)


def top_k_sizes(ks, n_left_out: int) -> list[int]:
    """The k of the top-k analysis: each requested k capped at n_left_out, deduplicated, sorted;
    a k that reaches n_left_out is left out (every instance is in the top k of both: precision
    and recall are 1 by construction)."""
    return sorted({min(int(k), n_left_out) for k in ks if int(k) > 0} - {n_left_out})


def recall_window(k: int, n_left_out: int, within: float) -> int:
    """m, the size of the method's list the gold standard's top k are looked for in:
    ⌈within · n_left_out⌉ (e.g. the method's top 10%), at least k, at most n_left_out."""
    return min(n_left_out, max(k, math.ceil(within * n_left_out - 1e-9)))


def top_k_hits(target: torch.Tensor, s: torch.Tensor, k: int, m: int, descending: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per test instance: precision@k = |top-k(method) ∩ top-k(gold)| / k and the recall of the
    gold standard's top k within the method's top m, |top-k(gold) ∩ top-m(method)| / k (m ≥ k).
    `descending`: the most helpful (largest scores), else the most harmful (smallest).
    target, s: [n_test, n_left_out]; returns two [n_test] tensors. Ties are broken by position."""
    n = s.shape[-1]
    order = s.double().argsort(dim=-1, descending=descending, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(n).expand_as(order))  # 0 = the method's first
    gold_top = target.double().argsort(dim=-1, descending=descending, stable=True)[:, :k]
    r = rank.gather(-1, gold_top)
    return (r < k).double().mean(-1), (r < m).double().mean(-1)


def top_k_agreement(gold: GoldStandard, scores: dict[str, torch.Tensor], ks=DEFAULT_TOP_K,
                    within: float = 0.1) -> pd.DataFrame:
    """One row per (method, kind, k, checkpoint): mean and SE over test instances of precision@k
    and of the recall of the gold standard's top k within the method's top m (:func:`top_k_hits`;
    m: :func:`recall_window`), for the k most helpful and the k most harmful instances. The
    gold standard's order is the same centred or not (centring subtracts one number per test
    instance), so there is no centring column."""
    x_name, xs = gold.checkpoint_axis()
    target = gold.attribution(center=False)  # [T, n_test, n_left_out]
    n = target.shape[-1]
    rows = []
    for name, s in scores.items():
        _check_shape(name, s, target)
        for k in top_k_sizes(ks, n):
            m = recall_window(k, n, within)
            for kind, descending in (("helpful", True), ("harmful", False)):
                for t in range(target.shape[0]):
                    precision, recall = top_k_hits(target[t], s, k, m, descending)
                    p_mean, p_se, count, _ = mean_and_se(precision)
                    r_mean, r_se, _, _ = mean_and_se(recall)
                    rows.append([name, kind, k, m, t, xs[t], x_name, p_mean, p_se, r_mean, r_se, count])
    return pd.DataFrame(rows, columns=TOPK_COLUMNS)


def top_k_summary(topk: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per method, the top-k numbers at the LAST checkpoint as summary columns:
    `precision_at_<k>_<kind>` and `recall_<k>_in_top_m_<kind>` (m per k in topk.csv)."""
    out: dict[str, dict[str, float]] = {}
    if not len(topk):
        return out
    last = topk[topk.checkpoint == topk.checkpoint.max()]
    for _, r in last.iterrows():
        row = out.setdefault(r.method, {})
        row[f"precision_at_{int(r.k)}_{r.kind}"] = float(r.precision)
        row[f"recall_{int(r.k)}_in_top_m_{r.kind}"] = float(r.recall)
    return out


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


# ------------------------------------------------------------------ summary
def summary_table(curves: pd.DataFrame, records: dict, overlap: dict[str, tuple[float, float]] | None = None,
                  by: tuple[str, ...] = ("method",), topk: dict[str, dict[str, float]] | None = None) -> pd.DataFrame:
    """Per method (and centring) of the `similarity_curves` rows: peak cosine and where it is,
    cosine and Spearman at the first and last checkpoints, Spearman values skipped as
    undefined, and the method's wall time and memory from its record (`records`: keyed by
    method label, or by (experiment, method label) when `by` = ("experiment", "method"));
    with `overlap`, each method's mean top-k overlap with the gold standard (examples.md's k);
    with `topk` (:func:`top_k_summary`), precision@k and recall at the last checkpoint."""
    rows = []
    for keys, g in curves.groupby([*by, "centered"], sort=True):
        keys = dict(zip([*by, "centered"], keys))
        cos = g[g.metric == "cosine"].sort_values("checkpoint")
        sp = g[g.metric == "spearman"].sort_values("checkpoint")
        peak = cos.loc[cos["mean"].idxmax()] if cos["mean"].notna().any() else cos.iloc[0]
        rec = records.get(keys["method"], {}) if by == ("method",) else records.get((keys[by[0]], keys["method"]), {})
        row = keys | {"peak_cosine": peak["mean"], "peak_checkpoint": int(peak["checkpoint"]), "peak_x": peak["x"],
                      "cosine_first": cos["mean"].iloc[0], "cosine_last": cos["mean"].iloc[-1],
                      "spearman_first": sp["mean"].iloc[0], "spearman_last": sp["mean"].iloc[-1],
                      "spearman_skipped": int(sp.n_skipped.sum()),
                      "seconds": rec.get("seconds", math.nan), "peak_mb": rec.get("peak_mb", math.nan)}
        if overlap is not None and keys["method"] in overlap:
            row["top_k_helpful_overlap"], row["top_k_harmful_overlap"] = overlap[keys["method"]]
        if topk is not None:
            row |= topk.get(keys["method"], {})
        rows.append(row)
    return pd.DataFrame(rows)
