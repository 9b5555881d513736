"""Numbers that are undefined, and why: a cosine of a zero vector, a rank correlation
or a top k of a constant one. The analyses leave such a test instance out of their means (NaN,
counted in `n_skipped`); this module derives from the data which test instances those are and
the reason, so that every report, figure, console line and W&B run says "undefined" with the
reason instead of printing `nan`, leaving a gap, or showing a number taken from the order of
ties.

One row per (analysis, method, metric, centring, reason, number undefined): `UNDEFINED_COLUMNS`,
written as `undefined.csv`. Shapes: a gold-standard attribution is [T, n_test, n_left_out],
method scores [n_test, n_left_out].
"""

from __future__ import annotations

import logging
import math
from collections import Counter

import pandas as pd
import torch

from tda.evaluation.top_k import constant_rows
from tda.further_training.attribution import GoldStandard

METHOD_CONSTANT = "the method's scores are constant over the left-out instances for this test instance"
GOLD_CONSTANT = "the gold standard is constant (zero) for this test instance"
ZERO_VECTOR = "a vector is zero (cosine undefined)"
METHOD_ZERO = "the method's scores are zero for this test instance"

log = logging.getLogger("tda.evaluation")

UNDEFINED_COLUMNS = ["analysis", "method", "metric", "centered", "where", "n_undefined", "n", "reason"]


def zero_rows(x: torch.Tensor) -> torch.Tensor:
    """[n_test] bool: rows of x [n_test, n] that are exactly zero (no direction: cosine undefined)."""
    return (x == 0).all(-1)


def instance_reasons(metric: str, gold: torch.Tensor, method: torch.Tensor, gold_constant: str = GOLD_CONSTANT,
                     method_constant: str = METHOD_CONSTANT, gold_zero: str = GOLD_CONSTANT,
                     method_zero: str = METHOD_ZERO) -> list[str]:
    """[n_test] why `metric` of each test instance is undefined ("" where it is defined), from
    the rows of `gold` and `method` [n_test, n] themselves: a cosine needs two non-zero vectors
    (tda.evaluation.metrics.rowwise_cosine); a rank correlation, a Pearson correlation and a top k
    need two vectors that vary (rowwise_spearman, top_k.top_k_hits)."""
    if metric == "cosine":
        bad = (zero_rows(gold), zero_rows(method))
        texts = (f"{ZERO_VECTOR}: {gold_zero}", f"{ZERO_VECTOR}: {method_zero}")
    else:
        bad = (constant_rows(gold), constant_rows(method))
        texts = (gold_constant, method_constant)
    return ["; ".join(t for t, b in zip(texts, flags) if b) for flags in zip(*(b.tolist() for b in bad))]


def undefined_rows(analysis: str, method: str, metric: str, centered: bool | None,
                   reasons_per_checkpoint: list[list[str]], x_name: str = "", xs: list[float] | None = None
                   ) -> list[list]:
    """Rows of `UNDEFINED_COLUMNS` from the reasons of every test instance at every checkpoint
    (:func:`instance_reasons`; one list without checkpoints): per reason, the number of test
    instances it makes undefined and where ("every checkpoint", or the checkpoints' x)."""
    n_checkpoints = len(reasons_per_checkpoint)
    n = len(reasons_per_checkpoint[0]) if n_checkpoints else 0
    by_reason: dict[str, dict[int, list[int]]] = {}  # reason -> count -> checkpoints
    for t, reasons in enumerate(reasons_per_checkpoint):
        for reason, count in Counter(r for r in reasons if r).items():
            by_reason.setdefault(reason, {}).setdefault(count, []).append(t)
    rows = []
    for reason, counts in by_reason.items():
        for count, ts in counts.items():
            if xs is None:
                where = ""
            elif len(ts) == n_checkpoints:
                where = "every checkpoint"
            else:
                where = f"{x_name} " + ", ".join(f"{xs[t]:g}" for t in ts)
            rows.append([analysis, method, metric, centered, where, count, n, reason])
    return rows


def similarity_undefined(gold: GoldStandard, scores: dict[str, torch.Tensor], metrics: tuple[str, ...],
                         centering: tuple[bool, ...]) -> pd.DataFrame:
    """Why the similarity curves (tda.evaluation.curves.similarity_curves) are undefined where
    they are, per method, metric and centring; and the top k (precision@k, recall, overlap;
    tda.evaluation.top_k), whose gold standard is never centred."""
    x_name, xs = gold.checkpoint_axis()
    rows = []
    for centered in centering:
        target = gold.attribution(center=centered)
        for name, s in scores.items():
            for metric in metrics:
                reasons = [instance_reasons(metric, target[t], s) for t in range(target.shape[0])]
                rows += undefined_rows("similarity", name, metric, centered, reasons, x_name, xs)
    target = gold.attribution(center=False)
    for name, s in scores.items():
        reasons = [instance_reasons("top_k", target[t], s) for t in range(target.shape[0])]
        rows += undefined_rows("top k", name, "precision, recall, overlap", None, reasons, x_name, xs)
    return pd.DataFrame(rows, columns=UNDEFINED_COLUMNS)


ONE_CLASS = "no left-out instance, or every one, has this test instance's class"


def class_structure_undefined(gold: GoldStandard, scores: dict[str, torch.Tensor], same: torch.Tensor,
                              centering: tuple[bool, ...]) -> pd.DataFrame:
    """Why the cosine with the same-class indicator (tda.evaluation.diagnostics.class_structure;
    `same` [n_test, n_left_out] bool) is undefined where it is: both are centred over the
    left-out instances, so a constant indicator or constant scores leave a zero vector."""
    x_name, xs = gold.checkpoint_axis()
    indicator, rows = same.double(), []
    for centered in centering:
        target = gold.attribution(center=centered)
        reasons = [instance_reasons("pearson", indicator, target[t], ONE_CLASS, GOLD_CONSTANT)
                   for t in range(target.shape[0])]
        rows += undefined_rows("class structure", "gold standard", "cosine with same class", centered, reasons,
                               x_name, xs)
    for name, s in scores.items():
        rows += undefined_rows("class structure", name, "cosine with same class", None,
                               [instance_reasons("pearson", indicator, s, ONE_CLASS)])
    return pd.DataFrame(rows, columns=UNDEFINED_COLUMNS)


def agreement_undefined(scores: dict[str, torch.Tensor], metrics: tuple[str, ...]) -> pd.DataFrame:
    """Why method-vs-method similarities (tda.evaluation.curves.method_agreement) are undefined."""
    names, rows = list(scores), []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            for metric in metrics:
                reasons = instance_reasons(metric, scores[a], scores[b], _constant(a), _constant(b), _zero(a), _zero(b))
                rows += undefined_rows("method vs method", f"{a} vs {b}", metric, None, [reasons])
    return pd.DataFrame(rows, columns=UNDEFINED_COLUMNS)


def gold_comparisons_undefined(gold: GoldStandard, metrics: tuple[str, ...], centering: tuple[bool, ...],
                               siblings: dict[str, GoldStandard] | None = None,
                               further: dict[str, GoldStandard] | None = None) -> pd.DataFrame:
    """Why the gold standard's own comparisons are undefined where they are: its split-half
    reliability (the first ⌊S/2⌋ seeds against the next; tda.evaluation.curves), against its
    `siblings` (gold vs gold, label -> gold standard) and, for a retraining gold standard, each
    further-training one in `further` against its last checkpoint (tda.evaluation.diagnostics).
    (Against the unadjusted gold standard a method is undefined where it is against the
    similarity's uncentred one: the two differ by a shift shared by every left-out instance.)"""
    x_name, xs = gold.checkpoint_axis()
    rows, n_seeds = [], len(gold.seeds)

    def pair(analysis: str, label: str, a: torch.Tensor, b: torch.Tensor, why_a: str, why_b: str, centered,
             axis: tuple[str, list[float]] = (x_name, xs)) -> None:
        """a [T, n_test, n] against b [T, n_test, n] (or one [n_test, n] for every checkpoint); a
        row constant (zero, for the cosine) on either side says `why_a` / `why_b`."""
        for metric in metrics:
            reasons = [instance_reasons(metric, a[t], b[t] if b.dim() == 3 else b, why_a, why_b, why_a, why_b)
                       for t in range(a.shape[0])]
            rows.extend(undefined_rows(analysis, label, metric, centered, reasons, *axis))

    for centered in centering:
        if n_seeds >= 2:
            half = n_seeds // 2
            pair("split-half reliability", f"{half} vs {half} seeds",
                 gold.attribution(center=centered, seeds=list(range(half))),
                 gold.attribution(center=centered, seeds=list(range(half, 2 * half))),
                 "the gold standard of the first half of the seeds is constant for this test instance",
                 "the gold standard of the second half of the seeds is constant for this test instance", centered)
        for label, other in (siblings or {}).items():
            pair("gold vs gold", f"gold standard vs {label}", gold.attribution(center=centered),
                 other.attribution(center=centered), GOLD_CONSTANT,
                 f"the gold standard {label} is constant (zero) for this test instance", centered)
        for label, other in (further or {}).items():
            pair("further training vs retraining", f"{label} vs retraining", other.attribution(center=centered),
                 gold.attribution(center=centered)[-1],
                 f"the further-training gold standard {label} is constant for this test instance",
                 "the retraining gold standard is constant (zero) at its last checkpoint for this test instance",
                 centered, other.checkpoint_axis())
    return pd.DataFrame(rows, columns=UNDEFINED_COLUMNS)


def _constant(name: str) -> str:
    return f"the scores of {name} are constant over the left-out instances for this test instance"


def _zero(name: str) -> str:
    return f"the scores of {name} are zero for this test instance"


# ---------------------------------------------------------------------------------- saying it
def sentence(row) -> str:
    """`grad_dot: spearman (centred) undefined for 6 of 6 test instances at every checkpoint:
    <reason>` for one row of `UNDEFINED_COLUMNS` (`centered` "both": said once for the two)."""
    centered = row["centered"]
    centring = "" if _missing(centered) or centered == "both" else \
        f" ({'centred' if _truthy(centered) else 'not centred'})"
    where = f" at {row['where']}" if isinstance(row["where"], str) and row["where"] else ""
    return (f"{row['method']}: {row['metric']}{centring} undefined for {int(row['n_undefined'])} of {int(row['n'])} "
            f"test instances{where}: {row['reason']}")


def sentences(undefined: pd.DataFrame | None) -> list[str]:
    """One :func:`sentence` per row; rows that differ only in the centring said once."""
    if undefined is None or not len(undefined):
        return []
    rest = [c for c in UNDEFINED_COLUMNS if c != "centered"]
    said: dict[tuple, list] = {}
    for _, r in undefined.iterrows():
        said.setdefault(tuple(str(r[c]) for c in rest), []).append(r)
    out = []
    for rows in said.values():
        if len(rows) == 2 and {_truthy(r["centered"]) for r in rows} == {True, False}:
            rows = [rows[0].copy()]
            rows[0]["centered"] = "both"
        out += [sentence(r) for r in rows]
    return out


def say_undefined(undefined: pd.DataFrame | None) -> None:
    """One warning on the console per undefined number (what `report.md` says)."""
    for s in sentences(undefined):
        log.warning("undefined: %s", s)


def wandb_notes(undefined: pd.DataFrame | None) -> dict[str, str]:
    """W&B summary text keys `undefined/<analysis>/<method>/<metric>[_<centring>]`: the sentences
    of :func:`sentence` (several joined by ' | '), beside the numbers that are missing there."""
    out: dict[str, str] = {}
    for _, r in (undefined if undefined is not None else pd.DataFrame(columns=UNDEFINED_COLUMNS)).iterrows():
        centring = "" if _missing(r["centered"]) else ("_centered" if _truthy(r["centered"]) else "_uncentered")
        key = f"undefined/{r.analysis}/{r.method}/{r.metric}{centring}".replace(" ", "_")
        out[key] = f"{out[key]} | {sentence(r)}" if key in out else sentence(r)
    return out


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA or v == ""


def _truthy(v) -> bool:
    return v is True or str(v) == "True"


def report_section(undefined: pd.DataFrame | None) -> list[str]:
    """Markdown lines for report.md: what is undefined and why (nothing when everything is defined)."""
    said = sentences(undefined)
    if not said:
        return []
    return ["### Undefined numbers", "",
            "A cell `undefined` is a mean over no test instance; where only some test instances are undefined, the "
            "number is the mean over the others. Which ones and why, derived from the scores themselves "
            "(`undefined.csv`; the other CSVs hold NaN where a number is undefined):", "", *[f"- {s}" for s in said],
            ""]


def series_notes(undefined: pd.DataFrame | None, analysis: str = "similarity") -> dict[str, str]:
    """Per method of `analysis`, a note for a figure's legend, one clause per metric (and
    centring, where the two differ): `<metric> undefined: <reason>` where every test instance is
    undefined at every checkpoint, else `<metric> partly undefined (k of n test instances[ at
    ...]: <reason>)`."""
    if undefined is None or not len(undefined):
        return {}
    notes = {}
    for method, g in undefined[undefined.analysis == analysis].groupby("method", sort=False):
        clauses: dict[tuple[str, str], list] = {}  # (metric, what) -> the centrings it holds for
        for _, r in g.iterrows():
            everywhere = _missing(r["where"]) or r["where"] == "every checkpoint"  # "": no checkpoint axis
            if r.n_undefined == r.n and everywhere:
                what = f"undefined: {r.reason}"
            else:
                where = "" if everywhere else f" at {r['where']}"
                what = f"partly undefined ({int(r.n_undefined)} of {int(r.n)} test instances{where}: {r.reason})"
            clauses.setdefault((r.metric, what), []).append(r.centered)
        said = []
        for (metric, what), centered in clauses.items():
            one_of_two = len(centered) == 1 and not _missing(centered[0]) and g.centered.nunique() > 1
            which = f" ({'centred' if _truthy(centered[0]) else 'not centred'})" if one_of_two else ""
            said.append(f"{metric}{which} {what}")
        notes[method] = "; ".join(said)
    return notes
