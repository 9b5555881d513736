"""The gold standard's most helpful and most harmful instances against each method's
(docs/method.md §4): per-instance ranks for the examples view, the mean top-k overlap, and
precision@k / recall of the gold standard's top k at every checkpoint. Scores are
[n_test, n_left_out]; a gold-standard attribution is [n_checkpoints, n_test, n_left_out]."""

from __future__ import annotations

import math

import pandas as pd
import torch

from tda.evaluation.curves import check_scores_shape
from tda.evaluation.metrics import mean_and_se
from tda.further_training.attribution import GoldStandard


# ------------------------------------------------------------------ top instances
def top_instances(target: torch.Tensor, scores: dict[str, torch.Tensor], test_positions: list[int],
                  left_out_indices: list[int], test_indices: list[int], k: int) -> pd.DataFrame:
    """For each chosen test instance (position in the evaluated test set), the k most helpful
    (largest gold score) and k most harmful (smallest) left-out instances of the gold
    standard `target` [n_test, n_left_out], with every method's score and rank (1 = most
    helpful by that method) for them, and whether the method also puts them in its own top k
    (helpful) / bottom k (harmful). A test instance whose gold standard is constant has no most
    helpful or harmful instances (no rows); a method constant for it has no rank and no
    agreement (<NA>): either would be the order of ties."""
    n = target.shape[-1]
    k = min(k, n)
    gold_constant, rows = constant_rows(target), []
    constant = {name: constant_rows(s) for name, s in scores.items()}
    for p in test_positions:
        if gold_constant[p]:
            continue
        g = target[p]
        ranks = {name: _rank_desc(s[p]) for name, s in scores.items()}
        for kind, order in (("helpful", g.argsort(descending=True)), ("harmful", g.argsort())):
            for r, j in enumerate(order[:k].tolist()):
                row = {"test_position": p, "test_index": test_indices[p], "kind": kind, "rank": r + 1,
                       "left_out_position": j, "train_index": left_out_indices[j], "gold": float(g[j])}
                for name, s in scores.items():
                    mr = pd.NA if constant[name][p] else int(ranks[name][j])
                    row[f"{name}:score"] = float(s[p, j])
                    row[f"{name}:rank"] = mr
                    row[f"{name}:agrees"] = pd.NA if mr is pd.NA else mr <= k if kind == "helpful" else mr > n - k
                rows.append(row)
    table = pd.DataFrame(rows)
    for name in scores if len(table) else ():  # whole numbers and booleans, empty in the CSV where undefined
        table[f"{name}:rank"] = table[f"{name}:rank"].astype("Int64")
        table[f"{name}:agrees"] = table[f"{name}:agrees"].astype("boolean")
    return table


def _rank_desc(v: torch.Tensor) -> torch.Tensor:
    ranks = torch.empty(len(v), dtype=torch.long)
    ranks[v.argsort(descending=True)] = torch.arange(1, len(v) + 1)
    return ranks


def top_k_overlap(target: torch.Tensor, s: torch.Tensor, k: int) -> tuple[float, float]:
    """Mean over test instances of |top-k(method) ∩ top-k(gold)| / k for the most helpful
    and the most harmful k. target, s: [n_test, n_left_out]. Test instances whose gold or
    method scores are all equal are left out (their top k would be position order); NaN when
    no test instance is left."""
    k = min(k, target.shape[-1])
    defined = ~(constant_rows(target) | constant_rows(s))
    target, s = target[defined], s[defined]
    def ov(descending):
        if not len(target):
            return math.nan
        a = target.argsort(dim=-1, descending=descending)[:, :k]
        b = s.argsort(dim=-1, descending=descending)[:, :k]
        return float(sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(a, b)) / (k * len(a)))
    return ov(True), ov(False)


# ------------------------------------------------------------------ the gold standard's top k
TOPK_COLUMNS = ["method", "kind", "k", "m", "checkpoint", "x", "x_name", "precision", "precision_se", "recall",
                "recall_se", "n"]


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
    target, s: [n_test, n_left_out]; returns two [n_test] tensors. Ties are broken by position;
    a test instance whose gold or method scores are all equal has no top k (any k of them would
    be chosen by position alone): NaN, which the means skip and count."""
    n = s.shape[-1]
    order = s.double().argsort(dim=-1, descending=descending, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(n).expand_as(order))  # 0 = the method's first
    gold_top = target.double().argsort(dim=-1, descending=descending, stable=True)[:, :k]
    r = rank.gather(-1, gold_top)
    undefined = constant_rows(target) | constant_rows(s)
    nan = torch.tensor(math.nan, dtype=torch.float64)
    return (torch.where(undefined, nan, (r < k).double().mean(-1)),
            torch.where(undefined, nan, (r < m).double().mean(-1)))


def constant_rows(x: torch.Tensor) -> torch.Tensor:
    """[n_test] bool: rows of x [n_test, n] with no variation (no order to take a top k from)."""
    return x.amax(-1) == x.amin(-1)


def top_k_agreement(gold: GoldStandard, scores: dict[str, torch.Tensor], ks: tuple[int, ...] | list[int],
                    within: float) -> pd.DataFrame:
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
        check_scores_shape(name, s, target)
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
