"""The field's yardsticks (docs/evaluation.md, "LDS and LOO correlation"), as tidy DataFrames in
the rows of the similarity curves (tda.evaluation.curves.CURVE_COLUMNS), so that the same rows go
to CSV, the figure and W&B:

- :func:`lds`: the linear datamodeling score. A method's scores τ(z, i) over the whole training
  set predict the output of a model trained on subset S as Σ_{i∈S} τ(z, i); the LDS of test
  instance z is the Spearman correlation, across the m subsets, of that prediction with the
  output the subset gold standard measured (TRAK's margin or −loss, averaged over its seeds).
- :func:`loo_correlation`: dattri's LOO correlation: the Pearson correlation, per test
  instance, of a method's scores with a leave-one-out gold standard's attribution over the
  left-out instances.

Both are averaged over test instances with their standard error (tda.evaluation.metrics.mean_and_se).
Shapes: scores [n_test, n_train]; masks [m, n_train] bool; subset outputs [T, n_test, m].
"""

from __future__ import annotations

import pandas as pd
import torch

from tda.evaluation.curves import CURVE_COLUMNS
from tda.evaluation.metrics import mean_and_se, rowwise_cosine, rowwise_spearman
from tda.evaluation.undefined import UNDEFINED_COLUMNS, instance_reasons, undefined_rows
from tda.scores import require_finite_scores

SCORE_WHOLE_TRAINING_SET = ("score every training instance: train, attribute, further-train and evaluate with "
                            "selection.n_left_out=null (a run directory of its own)")


def subset_predictions(scores: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """[n_test, m]: Σ_{i∈S_k} scores[z, i] for each subset k. scores [n_test, n_train], masks [m, n_train]."""
    if scores.shape[-1] != masks.shape[-1]:
        raise ValueError(f"scores over {scores.shape[-1]} training instances cannot be summed over subsets of "
                         f"{masks.shape[-1]} training rows; {SCORE_WHOLE_TRAINING_SET}")
    return scores.double() @ masks.double().T


def lds_per_test(scores: torch.Tensor, masks: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """[n_test] the LDS of each test instance: Spearman across subsets of the subset predictions
    and `outputs` [n_test, m] (NaN where either is constant across subsets)."""
    return rowwise_spearman(subset_predictions(scores, masks), outputs)


def rowwise_pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[n] Pearson correlation of the rows of a and b [n, d] (NaN for a constant row)."""
    a, b = a.double(), b.double()
    return rowwise_cosine(a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True))


def _row(method: str, metric: str, t: int, x: float, x_name: str, values: torch.Tensor) -> dict:
    mean, se, n, skipped = mean_and_se(values)
    return {"method": method, "metric": metric, "centered": False, "checkpoint": t, "x": x, "x_name": x_name,
            "mean": mean, "se": se, "n": n, "n_skipped": skipped}


def lds(scores: dict[str, torch.Tensor], masks: torch.Tensor, targets: dict[str, torch.Tensor], x_name: str,
        xs: list[float], predictors: dict[str, torch.Tensor] | None = None) -> pd.DataFrame:
    """The LDS of every method at every checkpoint of the subset gold standard, one row per
    (method, target, checkpoint) with metric `lds_<target>`: `scores` {method: [n_test, n_train]};
    `targets` {name: [T, n_test, m]} (the subset gold standard's `target(name)`); `xs` [T] the
    checkpoints' epochs or steps. `predictors` {label: [T, n_test, n_train]}: linear predictors
    that change with the checkpoint (a leave-one-out gold standard over the whole training set,
    its checkpoint t against the subsets' checkpoint t)."""
    rows = []
    for name, s in scores.items():
        require_finite_scores(name, s)
    for target, out in targets.items():
        for t in range(out.shape[0]):
            for name, s in scores.items():
                rows.append(_row(name, f"lds_{target}", t, xs[t], x_name, lds_per_test(s, masks, out[t])))
            for name, p in (predictors or {}).items():
                rows.append(_row(name, f"lds_{target}", t, xs[t], x_name, lds_per_test(p[t], masks, out[t])))
    return pd.DataFrame(rows, columns=CURVE_COLUMNS)


def loo_correlation(scores: dict[str, torch.Tensor], attribution: torch.Tensor, left_out: list[int], gold: str,
                    x_name: str, xs: list[float]) -> pd.DataFrame:
    """dattri's LOO correlation of every method against one leave-one-out gold standard, one row
    per (method, checkpoint) with metric `loo_correlation` and the gold standard's label in
    `gold`: `scores` {method: [n_test, n_train]}; `attribution` [T, n_test, n_left_out] the gold
    standard's, of the training rows `left_out`."""
    idx = torch.as_tensor(left_out, dtype=torch.long)
    rows = []
    for t in range(attribution.shape[0]):
        for name, s in scores.items():
            rows.append(_row(name, "loo_correlation", t, xs[t], x_name, rowwise_pearson(s[:, idx], attribution[t]))
                        | {"gold": gold})
    return pd.DataFrame(rows, columns=[*CURVE_COLUMNS, "gold"])


def lds_undefined(scores: dict[str, torch.Tensor], masks: torch.Tensor, targets: dict[str, torch.Tensor],
                  x_name: str, xs: list[float], predictors: dict[str, torch.Tensor] | None = None) -> pd.DataFrame:
    """Why the LDS of :func:`lds` (same arguments) is undefined where it is (rows of
    tda.evaluation.undefined.UNDEFINED_COLUMNS): a Spearman correlation across subsets needs
    the predictions and the measured outputs to vary across them."""
    rows = []
    for target, out in targets.items():
        gold_constant = f"the subset gold standard's {target} is the same for every subset for this test instance"
        for name, per_checkpoint in [*((n, [s] * out.shape[0]) for n, s in scores.items()),
                                     *((n, list(p)) for n, p in (predictors or {}).items())]:
            kind = "predictor's" if name in (predictors or {}) else "method's"
            constant = (f"the {kind} predictions (the sums of its scores over each subset) are the same for every "
                        f"subset for this test instance")
            reasons = [instance_reasons("spearman", out[t], subset_predictions(per_checkpoint[t], masks),
                                        gold_constant, constant) for t in range(out.shape[0])]
            rows += undefined_rows("lds", name, f"lds_{target}", None, reasons, x_name, xs)
    return pd.DataFrame(rows, columns=UNDEFINED_COLUMNS)


def loo_undefined(scores: dict[str, torch.Tensor], attribution: torch.Tensor, left_out: list[int], gold: str,
                  x_name: str, xs: list[float]) -> pd.DataFrame:
    """Why the LOO correlation of :func:`loo_correlation` (same arguments) is undefined where it
    is: a Pearson correlation needs both vectors to vary over the left-out instances."""
    idx = torch.as_tensor(left_out, dtype=torch.long)
    rows = []
    for name, s in scores.items():
        reasons = [instance_reasons("pearson", attribution[t], s[:, idx]) for t in range(attribution.shape[0])]
        rows += undefined_rows("loo correlation", name, f"loo_correlation vs {gold}", None, reasons, x_name, xs)
    return pd.DataFrame(rows, columns=UNDEFINED_COLUMNS)


def lds_summary(curves: pd.DataFrame, loo: pd.DataFrame | None, records: dict[str, dict]) -> pd.DataFrame:
    """Per method: the LDS of each target at the last checkpoint and its peak over checkpoints
    (with its SE), the LOO correlation against each leave-one-out gold standard at its last
    checkpoint, and the method's wall time and memory from its record."""
    rows = []
    for method, g in curves.groupby("method", sort=True):
        rec = records.get(method, {})
        row: dict = {"method": method, "centered": False}
        for metric, m in g.groupby("metric", sort=True):
            m = m.sort_values("checkpoint")
            last = m.iloc[-1]
            # undefined at every checkpoint: no peak and no checkpoint of one
            peak_mean, peak_x = (m.loc[m["mean"].idxmax(), ["mean", "x"]] if m["mean"].notna().any()
                                 else (float("nan"), float("nan")))
            row |= {f"{metric}_last": last["mean"], f"{metric}_last_se": last.se,
                    f"{metric}_peak": peak_mean, f"{metric}_peak_x": peak_x}
        if loo is not None:
            for gold, m in loo[loo.method == method].groupby("gold", sort=True):
                last = m.sort_values("checkpoint").iloc[-1]
                row |= {f"loo_correlation_last[{gold}]": last["mean"], f"loo_correlation_last_se[{gold}]": last.se}
        row |= {"seconds": rec.get("seconds", float("nan")), "peak_mb": rec.get("peak_mb", float("nan"))}
        rows.append(row)
    return pd.DataFrame(rows)
