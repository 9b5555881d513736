"""The evaluate stage: load the gold standard and every method's scores for one final
model, compare them, and write CSV + PNG + markdown to disk and the same data to W&B."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig

from tda.artifacts import load_json, load_tensors, save_text
from tda.evaluation.curves import similarity_curves
from tda.evaluation.plots import plot_curves
from tda.further_training.gold_standard import GoldStandard, load_gold_standard
from tda.runs import RunDir, further_training_key
from tda.tracking import finish, init_wandb

log = logging.getLogger(__name__)


def load_method_scores(run: RunDir, gold: GoldStandard) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Scores of every method computed for this final model, keyed by method directory name
    (`<method>-<config hash>`), checked against the gold standard's selections."""
    scores, records = {}, {}
    for d in sorted((run.path / "methods").glob("*/")):
        if not (d / "scores.safetensors").is_file():
            continue  # unfinished method: never read a partial result
        record = load_json(d / "record.json")
        if record["left_out_indices"] != gold.meta["left_out_indices"] or record["test_indices"] != gold.meta["test_indices"]:
            raise ValueError(f"{d} was computed for other left-out / test instances than the gold standard; "
                             f"delete it and re-run attribute.py for that method")
        label = record["method"] if sum(1 for p in (run.path / "methods").glob(f"{record['method']}-*")) == 1 else d.name
        scores[label] = load_tensors(d / "scores.safetensors")["scores"]
        records[label] = record
    return scores, records


def evaluate_run(cfg: DictConfig, run: RunDir) -> Path:
    gold = load_gold_standard(run.gold_dir(cfg))
    scores, records = load_method_scores(run, gold)
    if not scores:
        raise FileNotFoundError(f"no method scores for the final model in {run.path}; run e.g. "
                                f"`python attribute.py method=grad_dot` with the same overrides first")
    out = run.eval_dir(further_training_key(cfg))
    out.mkdir(parents=True, exist_ok=True)
    curves = similarity_curves(gold, scores, centering=tuple(bool(c) for c in cfg.evaluate.centering))
    curves.to_csv(out / "similarity.csv", index=False)
    title = f"{run.path.name} vs further training ({further_training_key(cfg)}, {len(gold.seeds)} seeds)"
    png = plot_curves(curves, out / "similarity.png", title=title)
    summary = summary_table(curves, records)
    summary.to_csv(out / "summary.csv", index=False)
    save_text(out / "report.md", markdown_report(title, summary, ["similarity.png"]))
    log_to_wandb(cfg, run, curves, summary, [png])
    log.info("evaluation written to %s", out)
    return out


def summary_table(curves: pd.DataFrame, records: dict[str, dict]) -> pd.DataFrame:
    rows = []
    for (method, centered), g in curves.groupby(["method", "centered"], sort=True):
        cos = g[g.metric == "cosine"].sort_values("checkpoint")
        sp = g[g.metric == "spearman"].sort_values("checkpoint")
        peak = cos.loc[cos["mean"].idxmax()] if cos["mean"].notna().any() else cos.iloc[0]
        rows.append({"method": method, "centered": centered, "peak_cosine": peak["mean"], "peak_x": peak["x"],
                     "cosine_first": cos["mean"].iloc[0], "cosine_last": cos["mean"].iloc[-1],
                     "spearman_first": sp["mean"].iloc[0], "spearman_last": sp["mean"].iloc[-1],
                     "seconds": records.get(method, {}).get("seconds")})
    return pd.DataFrame(rows)


def markdown_report(title: str, summary: pd.DataFrame, figures: list[str]) -> str:
    lines = [f"# {title}", ""]
    lines += [f"![{f}]({f})" for f in figures]
    lines += ["", "## Summary", "", summary.to_markdown(index=False, floatfmt=".4f") if _has_tabulate() else summary.to_string(index=False)]
    lines += ["", "Data: `similarity.csv` (every checkpoint), `summary.csv`.", ""]
    return "\n".join(lines)


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
        return True
    except ImportError:
        return False


def log_to_wandb(cfg: DictConfig, run: RunDir, curves: pd.DataFrame, summary: pd.DataFrame, figures: list[Path]) -> None:
    wb = init_wandb(cfg, "evaluate", f"{run.path.name}/evaluate")
    if wb is None:
        return
    import wandb

    x_name = curves.x_name.iloc[0]
    wb.define_metric(x_name)
    wb.define_metric("*", step_metric=x_name)
    for t, g in curves.groupby("checkpoint", sort=True):
        row = {x_name: float(g.x.iloc[0])}
        for _, r in g.iterrows():
            key = f"{r.metric}_{'centered' if r.centered else 'uncentered'}/{r.method}"
            row[key] = r["mean"]
            row[key + "_se"] = r.se
        wb.log(row)
    wb.log({"summary_table": wandb.Table(dataframe=summary), "curves_table": wandb.Table(dataframe=curves)})
    wb.log({f"figures/{p.stem}": wandb.Image(str(p)) for p in figures})
    for _, r in summary.iterrows():
        c = "centered" if r.centered else "uncentered"
        wb.summary[f"peak_cosine_{c}/{r.method}"] = r.peak_cosine
        wb.summary[f"cosine_first_{c}/{r.method}"] = r.cosine_first
    finish(wb)
