"""The evaluate stage: load the gold standard and every method's scores for one final
model, run every analysis of docs/method.md (Evaluation), and write the results to disk (CSV + PNG + a
markdown report linking them) and the same numbers to W&B.

`evaluate.compare` (a list of override strings) instead compares several experiments
(e.g. SGD vs Adam further training, or several further-training settings) in one figure.

The files of one evaluation are written as one set (`output_set`): into a staging directory
that is swapped into place only when every file is complete, so the output directory never
mixes two evaluations and never holds a truncated file.
"""

from __future__ import annotations

import logging
import math
import re
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from tda.artifacts import save_json, save_text
from tda.config import build, config_hash, to_container
from tda.evaluation.curves import (DEFAULT_WINDOWS, method_agreement, resolve_checkpoints, seed_window_peaks,
                                   similarity_curves, sorted_scores, split_half_reliability, top_instances,
                                   top_k_overlap)
from tda.evaluation import plots
from tda.evaluation.output_set import output_set
from tda.further_training.gold_standard import GoldStandard, expected_gold, load_gold_standard, seeds_of
from tda.provenance import FinalModel, read_final_model
from tda.scores import SCORES, load_method_scores
from tda.runs import RunDir, check_names, further_training_key, inside, runs_root
from tda.tracking import finish, init_wandb

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------- loading
def load_experiment(cfg: DictConfig, run: RunDir, final: FinalModel | None = None
                    ) -> tuple[GoldStandard, dict[str, torch.Tensor], dict[str, dict]]:
    """The gold standard of `cfg` and every method's scores for the final model of `run`, each
    verified and checked to be computed from that final model (and, for the gold standard, with
    the settings, seeds and selection of `cfg`)."""
    final = final if final is not None else read_final_model(run, cfg)
    ft = cfg.further_training
    gold = load_gold_standard(run.gold_dir(cfg), expected_gold(final.identity, final.selection, ft, cfg.further_optimizer),
                              seeds_of(ft))
    scores, records = load_all_method_scores(run, final.identity, gold)
    return gold, scores, records


def load_all_method_scores(run: RunDir, final_model: dict, gold: GoldStandard
                           ) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Scores [n_test, n_left_out] of every method computed for this final model. A method
    whose scores belong to another final model, or are damaged, is refused with its fix.
    Labels are the method name, or, when one method was run with several configs (e.g. a
    damping sweep), the name plus the config values that differ: `cg(damping=0.1)`."""
    shape = (len(gold.meta["test_indices"]), len(gold.meta["left_out_indices"]))
    loaded = []
    for d in sorted((run.path / "methods").glob("*/")):
        if not (d / SCORES).is_file():
            continue  # unfinished method: never read a partial result
        loaded.append((d, *load_method_scores(d, final_model, shape)))
    labels = _method_labels([r for _, _, r in loaded], [d.name for d, _, _ in loaded])
    scores = {label: s.double() for (_, s, _), label in zip(loaded, labels)}
    records = {label: r for (_, _, r), label in zip(loaded, labels)}
    return scores, records


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _method_labels(records: list[dict], dir_names: list[str]) -> list[str]:
    labels = []
    for rec, dname in zip(records, dir_names):
        same = [r for r in records if r["method"] == rec["method"]]
        if len(same) == 1:
            labels.append(rec["method"])
            continue
        flats = [_flat(r.get("config", {})) for r in same]
        keys = sorted({k for f in flats for k in f if len({repr(g.get(k)) for g in flats}) > 1})
        mine = _flat(rec.get("config", {}))
        labels.append(f"{rec['method']}({','.join(f'{k}={mine.get(k)}' for k in keys)})" if keys else dname)
    return labels


# ---------------------------------------------------------------------------------- one experiment
def evaluate_run(cfg: DictConfig, run: RunDir, final: FinalModel | None = None) -> Path:
    """Evaluate every method of `run` against its gold standard; returns `eval/<key>/`, which
    is replaced as one set (see `output_set`) and only then logged to W&B."""
    gold, scores, records = load_experiment(cfg, run, final)
    if not scores:
        raise FileNotFoundError(f"no method scores for the final model in {run.path}; run e.g. "
                                f"`python attribute.py method=grad_dot` with the same overrides first")
    key = further_training_key(cfg)
    out_dir = run.eval_dir(key)
    with output_set(out_dir) as staging:
        tables, figures, x_name = _write_evaluation(cfg, run, gold, scores, records, key, staging)
    # W&B reads the files from their final place: the staging directory no longer exists
    log_to_wandb(cfg, f"{run.path.name}/evaluate/{key}", tables, [out_dir / f.name for f in figures], x_name)
    log.info("evaluation written to %s", out_dir)
    return out_dir


def _write_evaluation(cfg: DictConfig, run: RunDir, gold: GoldStandard, scores: dict[str, torch.Tensor],
                      records: dict[str, dict], key: str, out: Path) -> tuple[dict[str, pd.DataFrame], list[Path], str]:
    """Run every analysis and write all of its files into `out` (a staging directory); returns
    the tables, the figures written and the name of the checkpoint axis, for W&B."""
    ev = cfg.evaluate
    centering = tuple(bool(c) for c in ev.centering)
    x_name, xs = gold.checkpoint_axis()
    n_seeds = len(gold.seeds)

    def attribution(center: bool, seeds: list[int]) -> torch.Tensor:
        return gold.attribution(center=center, seeds=seeds)

    title = f"{run.path.name} vs further training ({key}, {n_seeds} seeds, {len(gold.meta['test_indices'])} test instances)"
    tables: dict[str, pd.DataFrame] = {}
    figures: list[Path] = []

    curves = similarity_curves(gold, scores, centering=centering)
    reliability = split_half_reliability(attribution, n_seeds, x_name, xs, centering)
    tables["similarity"], tables["reliability"] = curves, reliability
    figures.append(plots.plot_curves(curves, out / "similarity.png", title=title, reliability=reliability))

    ks = [int(k) for k in ev.get("seed_windows", DEFAULT_WINDOWS)]
    peaks = seed_window_peaks(attribution, n_seeds, scores, ks, centering)
    tables["seed_windows"] = peaks
    if len(peaks):
        figures.append(plots.plot_seed_windows(peaks, out / "seed_windows.png", title=f"peak similarity vs seeds averaged — {title}"))

    cps = resolve_checkpoints(list(ev.get("sorted_checkpoints", ["first", "last"])), gold.n_checkpoints)
    srt = sorted_scores(gold, scores, cps, centering)
    tables["sorted_scores"] = srt
    figures.append(plots.plot_sorted_scores(srt, out / "sorted_scores.png", title=f"sorted scores — {title}"))

    agreement = method_agreement(scores)
    tables["agreement"] = agreement
    if len(agreement):
        figures.append(plots.plot_agreement(agreement, list(scores), out / "agreement.png", title="method vs method"))

    ex_cfg = ev.get("examples") or {}
    examples_md, example_figs, overlap = "", [], {}
    if int(ex_cfg.get("n_test", 0)) > 0 or ex_cfg.get("test_positions"):
        examples, examples_md, example_figs, overlap = _examples(cfg, gold, scores, out)
        tables["examples"] = examples
        figures += example_figs

    summary = summary_table(curves, records, overlap)
    tables["summary"] = summary
    for name, df in tables.items():
        df.to_csv(out / f"{name}.csv", index=False)
    if examples_md:
        save_text(out / "examples.md", examples_md)
    save_text(out / "report.md", markdown_report(title, summary, reliability, peaks, agreement, figures, out,
                                                 bool(examples_md)))
    # what this evaluation was computed from, by content
    save_json(out / "evaluated.json", {"run": str(run.path), "gold": str(run.gold_dir(cfg)), "seeds": gold.seeds,
                                       "final_model": gold.meta["final_model"], "gold_files": gold.files,
                                       "methods": {k: {"key": r.get("key"), "scores_sha256": r.get("scores_sha256")}
                                                   for k, r in records.items()}})
    return tables, figures, x_name


def summary_table(curves: pd.DataFrame, records: dict[str, dict], overlap: dict[str, tuple[float, float]] | None = None,
                  by: tuple[str, ...] = ("method",)) -> pd.DataFrame:
    """Per method (and centring): peak cosine and where it is, cosine and Spearman at the first
    and last checkpoints, Spearman values skipped as undefined, wall time and memory."""
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
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------- examples
def _examples(cfg: DictConfig, gold: GoldStandard, scores: dict[str, torch.Tensor], out: Path):
    """The most helpful / harmful left-out instances of chosen test instances, rendered for
    people, with each method's rank of them."""
    ex = cfg.evaluate.examples
    n_test = len(gold.meta["test_indices"])
    positions = [int(p) for p in (ex.get("test_positions") or range(min(int(ex.n_test), n_test)))]
    bad = [p for p in positions if not 0 <= p < n_test]
    if bad:
        raise ValueError(f"evaluate.examples.test_positions {bad} out of range: {n_test} test instances were evaluated")
    k = int(ex.get("k", 3))
    t = resolve_checkpoints([ex.get("checkpoint", "last")], gold.n_checkpoints)[0]
    centered = bool(ex.get("centered", True))
    target = gold.attribution(center=centered)[t]
    left_out, test_idx = gold.meta["left_out_indices"], gold.meta["test_indices"]
    table = top_instances(target, scores, positions, left_out, test_idx, k)
    overlap = {name: top_k_overlap(target, s, k) for name, s in scores.items()}
    data = build(cfg.dataset)
    x_name, xs = gold.checkpoint_axis()
    lines = ["# Most helpful and harmful left-out instances", "",
             f"Gold standard at {x_name} {xs[t]:g} ({'centred' if centered else 'not centred'}), top {k} of "
             f"{len(left_out)} left-out instances. A method *agrees* on an instance when it also ranks it in its own "
             f"top {k} (helpful) or bottom {k} (harmful). Mean top-{k} overlap with the gold standard over all "
             f"{n_test} test instances (helpful / harmful): "
             + ", ".join(f"{m} {h:.2f} / {b:.2f}" for m, (h, b) in overlap.items()), ""]
    figs = []
    for p in positions:
        sub = table[table.test_position == p]
        test_view = data.describe("test", test_idx[p])
        lines += [f"## Test instance {test_idx[p]} (label {test_view.get('label')})", ""]
        cols = ["kind", "rank", "train_index", "gold"] + [f"{m}:rank" for m in scores] + [f"{m}:agrees" for m in scores]
        views = {int(j): data.describe("train", int(j)) for j in sub.train_index}
        if data.modality == "text":
            lines += [f"> {_md(str(test_view.get('text', '')))}", ""]
            cols_txt = cols + ["label", "text"]
            rows = [list(r[c] for c in cols) + [views[int(r.train_index)].get("label"),
                                                  _md(str(views[int(r.train_index)].get("text", "")))]
                    for _, r in sub.iterrows()]
            lines += _md_table(cols_txt, rows)
        else:
            rows = [[r[c] for c in cols] + [views[int(r.train_index)].get("label")] for _, r in sub.iterrows()]
            lines += _md_table(cols + ["label"], rows)
            if data.modality == "image":
                def cap(r):
                    return f"#{int(r.train_index)} y={views[int(r.train_index)].get('label')} {r.gold:.2g}"
                img = lambda split, i, v: _image(data, split, i, v)  # noqa: E731
                helpful = [(img("train", int(r.train_index), views[int(r.train_index)]), cap(r)) for _, r in sub[sub.kind == "helpful"].iterrows()]
                harmful = [(img("train", int(r.train_index), views[int(r.train_index)]), cap(r)) for _, r in sub[sub.kind == "harmful"].iterrows()]
                f = plots.plot_image_examples((img("test", test_idx[p], test_view), f"#{test_idx[p]} y={test_view.get('label')}"),
                                              helpful, harmful, out / f"examples_test{test_idx[p]}.png")
                figs.append(f)
                lines += ["", f"![examples of test {test_idx[p]}]({f.name})"]
            else:
                # tabular: features as rows, instances as columns, so names and values read side by side
                order = [("test", test_view)] + [(f"{'+' if r.kind == 'helpful' else '−'}{int(r['rank'])} #{int(r.train_index)}",
                                                  views[int(r.train_index)]) for _, r in sub.iterrows()]
                feats = [f for f in dict.fromkeys(k for _, v in order for k in v) if f != "label"]
                lines += ["", "Features (missing = 0):", ""]
                lines += _md_table(["feature"] + [n for n, _ in order],
                                   [[f] + [_fmt(v.get(f, "")) for _, v in order] for f in feats])
        lines.append("")
    return table, "\n".join(lines), figs, overlap


def _image(data, split: str, index: int, view: dict):
    im = view.get("image")
    if im is not None:
        return im
    x, _ = data.tensors(split)
    arr = x[int(index)].float()
    arr = arr.permute(1, 2, 0) if arr.ndim == 3 else arr  # [C, H, W] -> [H, W, C]
    arr = arr.squeeze(-1) if arr.ndim == 3 and arr.shape[-1] == 1 else arr
    lo, hi = float(arr.min()), float(arr.max())
    return ((arr - lo) / (hi - lo if hi > lo else 1.0)).numpy()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return _md(str(v))


def _md(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def _md_table(cols: list[str], rows: list[list]) -> list[str]:
    def cell(v):
        if isinstance(v, (float, np.floating)):
            return f"{v:.4g}"
        return _md(str(v))
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]


# ---------------------------------------------------------------------------------- report
def markdown_report(title: str, summary: pd.DataFrame, reliability: pd.DataFrame, peaks: pd.DataFrame,
                    agreement: pd.DataFrame, figures: list[Path], out: Path, has_examples: bool) -> str:
    lines = [f"# {title}", "", "## Summary", ""]
    lines += _md_table(list(summary.columns), summary.values.tolist())
    lines += ["", "`peak_cosine` is the highest mean cosine over further-training checkpoints (at `peak_x`); "
              "`spearman_skipped` counts (test instance, checkpoint) pairs where Spearman is undefined "
              "(constant vector). `seconds` / `peak_mb`: the method's wall time and memory.", ""]
    if len(reliability):
        last = reliability[reliability.checkpoint == reliability.checkpoint.max()]
        lines += ["## Gold standard reliability", "",
                  f"Similarity between two disjoint halves of the seeds ({int(reliability.seeds_per_half.iloc[0])} each) "
                  "at the last checkpoint — the dashed ceiling in `similarity.png`:", ""]
        lines += _md_table(["metric", "centered", "mean", "se", "ceiling_full"],
                           last[["metric", "centered", "mean", "se", "ceiling_full"]].values.tolist())
        lines.append("")
    if len(peaks):
        cos = peaks[peaks.metric == "cosine"]
        piv = cos.pivot_table(index=["method", "centered"], columns="n_seeds_averaged", values="peak_mean").reset_index()
        lines += ["## Peak cosine vs seeds averaged", ""]
        lines += _md_table([str(c) for c in piv.columns], piv.values.tolist())
        lines.append("")
    if len(agreement):
        lines += ["## Method vs method", ""]
        lines += _md_table(list(agreement.columns), agreement.values.tolist())
        lines.append("")
    lines += ["## Figures", ""] + [f"![{f.stem}]({f.name})" for f in figures] + [""]
    if has_examples:
        lines += ["Most helpful / harmful instances, rendered: [examples.md](examples.md)", ""]
    csvs = sorted(p.name for p in out.glob("*.csv"))
    lines += ["## Data", ""] + [f"- [{c}]({c})" for c in csvs] + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- W&B
def _c(centered) -> str:
    return "centered" if bool(centered) else "uncentered"


def wandb_curve_rows(curves: pd.DataFrame, reliability: pd.DataFrame | None, x_name: str,
                     series: tuple[str, ...] = ("method",)) -> list[dict[str, float]]:
    """The history rows logged for the similarity curves: one row per checkpoint x with
    `<metric>_<centered|uncentered>/<series...>` (mean) and `.../se` keys."""
    by_x: dict[float, dict[str, float]] = {}
    for _, r in curves.iterrows():
        key = f"{r.metric}_{_c(r.centered)}/" + "/".join(str(r[s]) for s in series)
        row = by_x.setdefault(float(r.x), {x_name: float(r.x)})
        row[key], row[key + "/se"] = float(r["mean"]), float(r.se)
    if reliability is not None:
        for _, r in reliability.iterrows():
            key = f"{r.metric}_{_c(r.centered)}/gold_split_half"
            row = by_x.setdefault(float(r.x), {x_name: float(r.x)})
            row[key], row[key + "/se"] = float(r["mean"]), float(r.se)
    return [by_x[x] for x in sorted(by_x)]


def wandb_summary(summary: pd.DataFrame, series: tuple[str, ...] = ("method",)) -> dict[str, float]:
    out = {}
    for _, r in summary.iterrows():
        base = f"summary/{_c(r.centered)}/" + "/".join(str(r[s]) for s in series)
        for col in summary.columns:
            if col in (*series, "centered"):
                continue
            v = r[col]
            if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
                out[f"{base}/{col}"] = float(v)
    return out


def log_to_wandb(cfg: DictConfig, name: str, tables: dict[str, pd.DataFrame], figures: list[Path], x_name: str,
                 series: tuple[str, ...] = ("method",)) -> None:
    """Native charts (history keys against the further-training x, so runs of a sweep overlay),
    one line_series chart per metric, every table, every figure and the summary scalars."""
    wb = init_wandb(cfg, "evaluate", name)
    if wb is None:
        return
    import wandb

    try:
        curves, reliability = tables["similarity"], tables.get("reliability")
        rows = wandb_curve_rows(curves, reliability, x_name, series)
        wb.define_metric(x_name, hidden=False)
        for k in sorted({k for r in rows for k in r if k != x_name}):
            wb.define_metric(k, step_metric=x_name)
        peaks = tables.get("seed_windows")
        peak_rows: dict[int, dict[str, float]] = {}
        if peaks is not None and len(peaks):
            wb.define_metric("seeds_averaged")
            for _, r in peaks.iterrows():
                key = f"peak_vs_seeds/{r.metric}_{_c(r.centered)}/" + "/".join(str(r[s]) for s in series)
                peak_rows.setdefault(int(r.n_seeds_averaged), {"seeds_averaged": int(r.n_seeds_averaged)})[key] = float(r.peak_mean)
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
            charts[f"charts/{metric}_{_c(centered)}"] = wandb.plot.line_series(
                xs=xs, ys=ys, keys=list(lines), title=f"{metric} ({_c(centered)}) vs further training", xname=x_name)
        wb.log(charts)
        wb.log({f"tables/{k}": wandb.Table(dataframe=_wandb_safe(df)) for k, df in tables.items() if len(df)})
        wb.log({f"figures/{p.stem}": wandb.Image(str(p)) for p in figures})
        wb.summary.update(wandb_summary(tables["summary"], series))
    finally:
        finish(wb)


def _wandb_safe(df: pd.DataFrame) -> pd.DataFrame:
    """W&B tables need one type per column: objects (None / mixed) become strings."""
    df = df.copy()
    for c in df.columns:
        if df[c].dtype == object:
            df[c] = df[c].map(lambda v: "" if v is None else str(v))
    return df


# ---------------------------------------------------------------------------------- several experiments
def apply_overrides(cfg: DictConfig, overrides: str) -> DictConfig:
    """A copy of `cfg` with Hydra-style overrides (space-separated): `group=option` swaps in
    that config group's node (e.g. `further_optimizer=adam`), `a.b=value` sets a value (YAML
    syntax), in order. `experiment=name` starts from the composed experiment instead."""
    new = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    for item in shlex.split(overrides):
        if "=" not in item:
            raise ValueError(f"evaluate.compare entry {overrides!r}: {item!r} is not key=value")
        key, value = item.split("=", 1)
        key = key.lstrip("+")
        if "." not in key and (CONF_DIR / key).is_dir():  # a config group; a top-level value (seed=1) is set below
            composed = _compose([item])
            if key == "experiment":
                new = OmegaConf.create(OmegaConf.to_container(composed, resolve=False))
                continue
            if key not in composed:
                raise ValueError(f"evaluate.compare entry {overrides!r}: {key} is not a config group")
            new[key] = OmegaConf.to_container(composed[key], resolve=False)
        else:
            if OmegaConf.select(new, key, default="__missing__") == "__missing__":
                raise ValueError(f"evaluate.compare entry {overrides!r}: no config key {key!r}")
            OmegaConf.update(new, key, _override_value(item), merge=False)
    return new


def _override_value(item: str) -> Any:
    """The value of `key=value` parsed exactly as on Hydra's command line (1e-6 is a float,
    [a,b] a list, null None)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    value = OverridesParser.create().parse_override(item).value()
    return OmegaConf.to_container(OmegaConf.create({"v": value}))["v"] if not isinstance(value, (str, int, float, bool, type(None))) else value


def _compose(overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(config_name="evaluate", overrides=overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="evaluate", overrides=overrides)


CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=,-]+", "_", s).strip("_")[:60] or "base"


def evaluate_compare(cfg: DictConfig) -> Path:
    """One figure and table across experiments: `evaluate.compare` lists override strings,
    each applied to the current config to find a final model, its gold standard and its
    methods (which must already exist). Lines are `<experiment> / <method>`. Written as one
    set into `runs/compare/<name>-<hash>/` (see `output_set`), then logged to W&B."""
    check_names(cfg)  # `name` names the output directory: refuse an unsafe one before any work
    entries = [str(e) for e in cfg.evaluate.compare]
    centering = tuple(bool(c) for c in cfg.evaluate.centering)
    wanted = cfg.evaluate.get("compare_methods")
    all_curves, all_rel, all_records, x_names = [], [], {}, set()
    for entry in entries:
        sub = apply_overrides(cfg, entry)
        run = RunDir.from_config(sub)
        gold, scores, records = load_experiment(sub, run)
        if wanted:
            scores = {k: v for k, v in scores.items() if k in set(wanted)}
        if not scores:
            raise FileNotFoundError(f"evaluate.compare entry {entry!r}: no method scores in {run.path} "
                                    f"(compare_methods={list(wanted) if wanted else 'all'})")
        label = entry or "base"
        x_name, xs = gold.checkpoint_axis()
        x_names.add(x_name)
        c = similarity_curves(gold, scores, centering)
        c.insert(0, "experiment", label)
        all_curves.append(c)
        rel = split_half_reliability(lambda ce, s: gold.attribution(center=ce, seeds=s), len(gold.seeds), x_name, xs, centering)
        rel.insert(0, "experiment", label)
        all_rel.append(rel)
        all_records.update({(label, k): v | {"run": str(run.path), "gold": str(run.gold_dir(sub))} for k, v in records.items()})
    if len(x_names) > 1:
        raise ValueError(f"evaluate.compare mixes checkpoint axes {sorted(x_names)}; compare experiments that "
                         f"checkpoint the same way (all per epoch or all every k steps)")
    x_name = x_names.pop()
    curves = pd.concat(all_curves, ignore_index=True)
    reliability = pd.concat(all_rel, ignore_index=True)
    name = cfg.name if cfg.get("name") is not None else "unnamed"
    root = runs_root(cfg)
    out_dir = inside(root, root / "compare" / f"{name}-{config_hash(entries, to_container(cfg.evaluate))}")
    summary = summary_table(curves, all_records, by=("experiment", "method"))
    with output_set(out_dir) as out:
        curves.to_csv(out / "similarity.csv", index=False)
        reliability.to_csv(out / "reliability.csv", index=False)
        summary.to_csv(out / "summary.csv", index=False)
        plot_df = curves.assign(series=curves.experiment + " / " + curves.method)
        rel_lines = reliability.assign(series=reliability.experiment + " / gold split-half", method="gold_split_half")
        both = pd.concat([plot_df, rel_lines[[c for c in plot_df.columns if c in rel_lines.columns]]], ignore_index=True)
        title = f"comparison: {' vs '.join(e or 'base' for e in entries)}"
        figures = [plots.plot_curves(both, out / "similarity.png", title=title, series="series", style_by="experiment")]
        lines = [f"# {title}", "", "Experiments (override strings applied to the evaluate config):", ""]
        lines += [f"- `{e or 'base'}`: {sorted({r['run'] for (lab, _), r in all_records.items() if lab == (e or 'base')})}" for e in entries]
        lines += ["", "## Summary", ""] + _md_table(list(summary.columns), summary.values.tolist())
        lines += ["", "![similarity](similarity.png)", "", "Data: [similarity.csv](similarity.csv), "
                  "[reliability.csv](reliability.csv), [summary.csv](summary.csv)", ""]
        save_text(out / "report.md", "\n".join(lines))
    tables = {"similarity": curves, "reliability": None, "summary": summary}
    # W&B reads the figures from their final place: the staging directory no longer exists
    log_to_wandb(cfg, f"compare/{name}/{_slug('_vs_'.join(entries))}", {k: v for k, v in tables.items() if v is not None},
                 [out_dir / f.name for f in figures], x_name, series=("experiment", "method"))
    log.info("comparison written to %s", out_dir)
    return out_dir
