"""W&B logging of an evaluation: the same numbers as its CSVs, as native charts (history keys
against the further-training checkpoint, so runs of a sweep overlay), line-series charts,
tables, figures and summary scalars; an undefined number (NaN) is a gap in the charts, absent
from the summary, and said in words with its reason under `undefined/...`."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from tda.evaluation.undefined import wandb_notes
from tda.tracking import finish, init_wandb


def _centring(centered) -> str:
    return "centered" if bool(centered) else "uncentered"


def wandb_curve_rows(curves: pd.DataFrame, reliability: pd.DataFrame | None, x_name: str,
                     series: tuple[str, ...] = ("method",), topk: pd.DataFrame | None = None,
                     gold_agreement: pd.DataFrame | None = None, adjustment: pd.DataFrame | None = None,
                     distance: pd.DataFrame | None = None, class_structure: pd.DataFrame | None = None
                     ) -> list[dict[str, float]]:
    """The history rows logged for the similarity curves: one row per checkpoint x with
    `<metric>_<centered|uncentered>/<series...>` (mean) and `.../se` keys; with `topk`,
    `top_k/<precision|recall>_<k>_<kind>/<method>`; with `gold_agreement`,
    `gold_agreement/<metric>_<centering>/<other gold standard>` (and `/se`); with `adjustment`,
    `adjustment/<metric>_<adjusted|unadjusted>/<method>` (and `/se`); with `distance`,
    `distance_from_start` (and `/se`); with `class_structure`, the gold standard's
    `class_structure/<column>_<centering>/gold_standard` (methods: :func:`wandb_summary`)."""
    by_x: dict[float, dict[str, float]] = {}

    def add_mean_and_se(frame: pd.DataFrame, key_of) -> None:
        """Each row's mean and SE under key_of(row) and key_of(row)/se, at its checkpoint x."""
        for _, r in frame.iterrows():
            row, key = by_x.setdefault(float(r.x), {x_name: float(r.x)}), key_of(r)
            row[key], row[key + "/se"] = float(r["mean"]), float(r.se)

    add_mean_and_se(curves, lambda r: f"{r.metric}_{_centring(r.centered)}/" + "/".join(str(r[s]) for s in series))
    if reliability is not None:
        add_mean_and_se(reliability, lambda r: f"{r.metric}_{_centring(r.centered)}/gold_split_half")
    if topk is not None:
        for _, r in topk.iterrows():
            row = by_x.setdefault(float(r.x), {x_name: float(r.x)})
            for measure in ("precision", "recall"):
                row[f"top_k/{measure}_{int(r.k)}_{r.kind}/{r.method}"] = float(r[measure])
    if gold_agreement is not None:
        add_mean_and_se(gold_agreement, lambda r: f"gold_agreement/{r.metric}_{_centring(r.centered)}/{r.sibling}")
    if adjustment is not None:
        add_mean_and_se(adjustment, lambda r: f"adjustment/{r.metric}_{'adjusted' if r.adjusted else 'unadjusted'}/"
                                              f"{r.method}")
    if distance is not None:
        add_mean_and_se(distance, lambda r: "distance_from_start")
    if class_structure is not None:
        for _, r in class_structure[class_structure.source == "gold standard"].iterrows():
            row = by_x.setdefault(float(r.x), {x_name: float(r.x)})
            for col in CLASS_STRUCTURE_LOGGED:
                row[f"class_structure/{col}_{_centring(r.centered)}/gold_standard"] = float(r[col])
    return [by_x[x] for x in sorted(by_x)]


CLASS_STRUCTURE_LOGGED = ("same_class", "other_class", "difference", "cosine_same_class")


def wandb_summary(summary: pd.DataFrame, series: tuple[str, ...] = ("method",),
                  class_structure: pd.DataFrame | None = None) -> dict[str, float]:
    """Every defined numeric cell of the summary table as `summary/<centring>/<series...>/<column>`
    (an undefined one, NaN, is left out); with `class_structure`, each method's
    `class_structure/<column>/<method>`."""
    out = {}
    if class_structure is not None:
        for _, r in class_structure[class_structure.source != "gold standard"].iterrows():
            out |= {f"class_structure/{col}/{r.source}": float(r[col]) for col in CLASS_STRUCTURE_LOGGED
                    if not math.isnan(r[col])}
    for _, r in summary.iterrows():
        base = f"summary/{_centring(r.centered)}/" + "/".join(str(r[s]) for s in series)
        for col in summary.columns:
            if col in (*series, "centered"):
                continue
            v = r[col]
            # NaN (undefined) is left out: W&B would show it as a number; undefined/... keys say why
            if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and not math.isnan(v):
                out[f"{base}/{col}"] = float(v)
    return out


def log_to_wandb(cfg: DictConfig, name: str, tables: dict[str, pd.DataFrame], figures: list[Path], x_name: str,
                 series: tuple[str, ...] = ("method",)) -> None:
    """Native charts (history keys against the further-training x, so runs of a sweep overlay),
    one line_series chart per metric, every table, every figure and the summary scalars.
    Nothing when the logger is off (`logger=none`)."""
    wb = init_wandb(cfg, "evaluate", name)
    if wb is None:
        return
    import wandb  # noqa: PLC0415 - slow to import: only when the logger is on

    try:
        # the similarity curves, or against a subset gold standard the LDS (tda.evaluation.evaluate_lds)
        curves = tables["similarity"] if "similarity" in tables else tables["lds"]
        reliability = tables.get("reliability")
        rows = wandb_curve_rows(curves, reliability, x_name, series, tables.get("topk"), tables.get("gold_agreement"),
                                tables.get("adjustment"), tables.get("distance"), tables.get("class_structure"))
        wb.define_metric(x_name, hidden=False)
        for k in sorted({k for r in rows for k in r if k != x_name}):
            wb.define_metric(k, step_metric=x_name)
        peaks = tables.get("seed_windows")
        peak_rows: dict[int, dict[str, float]] = {}
        if peaks is not None and len(peaks):
            wb.define_metric("seeds_averaged")
            for _, r in peaks.iterrows():
                key = (f"peak_vs_seeds/{r.definition}/{r.metric}_{_centring(r.centered)}/"
                       + "/".join(str(r[s]) for s in series))
                by_k = peak_rows.setdefault(int(r.n_seeds_averaged), {"seeds_averaged": int(r.n_seeds_averaged)})
                by_k[key] = float(r.peak_mean)
            for k in sorted({k for r in peak_rows.values() for k in r if k != "seeds_averaged"}):
                wb.define_metric(k, step_metric="seeds_averaged")
        for row in rows:
            wb.log(row)
        for k in sorted(peak_rows):
            wb.log(peak_rows[k])
        charts = {}
        for (metric, centered), g in curves.groupby(["metric", "centered"], sort=True):
            lines = {" / ".join(str(v) for v in (key if isinstance(key, tuple) else (key,))): s.sort_values("x")
                     for key, s in g.groupby(list(series), sort=True)}
            xs = sorted(g.x.unique().tolist())
            ys = [[float(s.set_index("x")["mean"].get(x, math.nan)) for x in xs] for s in lines.values()]
            charts[f"charts/{metric}_{_centring(centered)}"] = wandb.plot.line_series(
                xs=xs, ys=ys, keys=list(lines), title=f"{metric} ({_centring(centered)}) vs further training",
                xname=x_name)
        wb.log(charts)
        wb.log({f"tables/{k}": wandb.Table(dataframe=_wandb_safe(df)) for k, df in tables.items() if len(df)})
        wb.log({f"figures/{p.stem}": wandb.Image(str(p)) for p in figures})
        wb.summary.update(wandb_summary(tables["summary"], series, tables.get("class_structure"))
                          | wandb_notes(tables.get("undefined")))
    finally:
        finish(wb)


def _wandb_safe(df: pd.DataFrame) -> pd.DataFrame:
    """W&B tables need one type per column: objects (None / mixed) become strings; a nullable
    integer column (<NA>: undefined, e.g. the peak checkpoint of a curve undefined everywhere)
    becomes float (NaN), a nullable boolean one the words True / False / undefined."""
    df = df.copy()
    for c in df.columns:
        if isinstance(df[c].dtype, pd.BooleanDtype):
            df[c] = df[c].map(lambda v: "undefined" if v is pd.NA else str(bool(v)))
        elif isinstance(df[c].dtype, pd.api.extensions.ExtensionDtype) and pd.api.types.is_integer_dtype(df[c]):
            df[c] = df[c].astype("float64")
        elif df[c].dtype == object:
            df[c] = df[c].map(lambda v: "" if v is None else str(v))
    return df


def log_mislabel_to_wandb(cfg: DictConfig, name: str, tables: dict[str, pd.DataFrame], figures: list[Path],
                          constant: dict[str, str] | None = None) -> None:
    """Mislabel detection (tda.evaluation.evaluate_mislabel): each source's AUC and found-at
    fractions as summary scalars `mislabel/<method>/<column>`, the detection curves as one
    line_series chart, every table and figure; a source whose self-influence is constant
    (`constant`: label -> why) under `undefined/mislabel/<label>`. Nothing when the logger is off."""
    wb = init_wandb(cfg, "evaluate", name)
    if wb is None:
        return
    import wandb  # noqa: PLC0415 - slow to import: only when the logger is on

    try:
        table = tables["mislabel"]
        wb.summary.update({f"mislabel/{r['method']}/{col}": float(r[col]) for _, r in table.iterrows()
                           for col in table.columns if col.startswith(("auc", "found_at_"))}
                          | {f"undefined/mislabel/{label}": said for label, said in (constant or {}).items()})
        curves = tables["detection_curve"]
        lines = {m: g.sort_values("inspected") for m, g in curves.groupby("method", sort=False)}
        xs = next(iter(lines.values())).inspected.tolist()
        wb.log({"charts/mislabel_detection": wandb.plot.line_series(
            xs=xs, ys=[g.found.tolist() for g in lines.values()], keys=list(lines),
            title="flipped labels found vs training set inspected", xname="fraction inspected")})
        wb.log({f"tables/{k}": wandb.Table(dataframe=_wandb_safe(df)) for k, df in tables.items() if len(df)})
        wb.log({f"figures/{p.stem}": wandb.Image(str(p)) for p in figures})
    finally:
        finish(wb)
