"""The evaluate flow against a subset gold standard (`further_training.runs=subsets`): the linear
datamodeling score of every method and of every leave-one-out gold standard over the whole
training set of the run (each itself a linear predictor), and the LOO correlation of every
method against every leave-one-out gold standard of the run (tda.evaluation.lds). Written as one
set into `eval/<key>/` (`lds.csv`, `lds.png`, `loo_correlation.csv`/`.png`, `summary.csv`,
`report.md`, `evaluated.json`), then logged to W&B like the other analyses."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig

from tda.artifacts import save_json, save_text
from tda.evaluation import plots
from tda.evaluation.lds import SCORE_WHOLE_TRAINING_SET, lds, lds_summary, lds_undefined, loo_correlation, loo_undefined
from tda.evaluation.loading import load_all_method_scores
from tda.evaluation.markdown import md_table
from tda.evaluation.output_set import output_set
from tda.evaluation.progress import Steps
from tda.evaluation.undefined import report_section, say_undefined, series_notes
from tda.evaluation.wandb_logging import log_to_wandb
from tda.further_training.related import leave_one_out_beside
from tda.further_training.store import GoldStandardSpec
from tda.further_training.subset_store import SubsetGoldStandard, load_subset_gold_standard
from tda.provenance import FinalModel
from tda.runs import RunDir

log = logging.getLogger(__name__)


def evaluate_lds_run(cfg: DictConfig, spec: GoldStandardSpec, run: RunDir, final: FinalModel) -> Path:
    """Evaluate every method of `run` against the subset gold standard `spec`; returns
    `eval/<key>/` (replaced as one set, then logged to W&B). Methods must score every training
    instance (`selection.n_left_out=null`)."""
    key = spec.key
    steps = Steps("evaluate")
    with steps.step("loading", f"the subset gold standard {key} and the method scores of {run.path.name}"):
        gold = load_subset_gold_standard(run.gold_dir(key), spec.expected(final.identity, final.selection),
                                         spec.settings.seeds)
        n_train = gold.masks.shape[1]
        if list(gold.meta["left_out_indices"]) != list(range(n_train)):
            raise ValueError(f"the linear datamodeling score sums each method's scores over a subset's training rows, "
                             f"but the methods of {run.path.name} score {len(gold.meta['left_out_indices'])} of the "
                             f"{n_train} training instances; {SCORE_WHOLE_TRAINING_SET}")
        scores, records = load_all_method_scores(run, final.identity, gold)
    if not scores:
        raise FileNotFoundError(f"no method scores for the final model in {run.path}; run e.g. "
                                f"`python attribute.py method=grad_dot` with the same overrides first")
    with steps.step("loading", "the run's leave-one-out gold standards (LOO correlation, linear predictors)"):
        beside, skipped = leave_one_out_beside(gold.meta, run)
        for why in skipped:
            log.warning("not comparing with the leave-one-out gold standard %s", why)
    out_dir = run.eval_dir(key)
    with output_set(out_dir) as staging:
        tables, figures, x_name = _write(run, key, gold, scores, records, beside, staging, steps)
    with steps.step("W&B"):
        log_to_wandb(cfg, f"{run.path.name}/evaluate/{key}", tables, [out_dir / f.name for f in figures], x_name)
    log.info("evaluation written to %s in %s", out_dir, steps.timings())
    return out_dir


def _write(run: RunDir, key: str, gold: SubsetGoldStandard, scores: dict[str, torch.Tensor], records: dict,
           beside: dict, out: Path, steps: Steps) -> tuple[dict[str, pd.DataFrame], list[Path], str]:
    """Every analysis, its files written into `out`; returns the tables, figures and x axis name."""
    x_name, xs = gold.checkpoint_axis()
    m, n_train = gold.masks.shape
    target = next(name for name in gold.outputs if name != "loss")  # margin | prediction (subsets.OUTPUTS)
    targets = {name: gold.target(name) for name in (target, "loss")}
    n_test = len(gold.meta["test_indices"])
    title = (f"{run.path.name} vs {gold.kind} ({key}, {m} subsets keeping {gold.meta['subsets']['size']} of "
             f"{n_train}, {len(gold.seeds)} seeds, {n_test} test instances)")
    tables: dict[str, pd.DataFrame] = {}
    figures: list[Path] = []
    # a leave-one-out gold standard over the whole training set predicts like a method: its
    # checkpoint t against the subsets' checkpoint t where both have as many, else its last
    predictors = {}
    for label, (_, g) in beside.items():
        if list(g.meta["left_out_indices"]) == list(range(n_train)):
            a = g.attribution(center=False)
            predictors[f"gold: {label}"] = a if a.shape[0] == gold.n_checkpoints else a[-1:].expand(
                gold.n_checkpoints, *a.shape[1:])
    with steps.step("LDS", f"{len(scores)} methods and {len(predictors)} gold standards, {m} subsets, "
                           f"{gold.n_checkpoints} checkpoints"):
        curves = tables["lds"] = lds(scores, gold.masks, targets, x_name, xs, predictors)
        undefined = [lds_undefined(scores, gold.masks, targets, x_name, xs, predictors)]
        figures.append(plots.plot_curves(curves, out / "lds.png", title=f"linear datamodeling score — {title}",
                                         notes=series_notes(undefined[0], "lds")))
    loo = None
    if beside:
        with steps.step("LOO correlation", ", ".join(beside)):
            frames = []
            for label, (_, g) in beside.items():
                gx_name, gxs = g.checkpoint_axis()
                args = (scores, g.attribution(center=False), g.meta["left_out_indices"], label, gx_name, gxs)
                frames.append(loo_correlation(*args))
                undefined.append(loo_undefined(*args))
            loo = tables["loo_correlation"] = pd.concat(frames, ignore_index=True)
            several = len(beside) > 1
            shown = loo.assign(method=loo.method + " vs " + loo.gold) if several else loo
            loo_why = pd.concat(undefined[1:], ignore_index=True)
            if several:  # the figure's lines are `<method> vs <gold standard>`
                loo_why = loo_why.assign(method=loo_why.method + " vs "
                                         + loo_why.metric.str.removeprefix("loo_correlation vs "))
            notes = series_notes(loo_why, "loo correlation")
            figures.append(plots.plot_curves(shown, out / "loo_correlation.png",
                                             title=f"LOO correlation (Pearson, dattri's) — {run.path.name}",
                                             notes=notes))
    undefined = tables["undefined"] = pd.concat(undefined, ignore_index=True)
    say_undefined(undefined)
    with steps.step("writing", "tables, report.md"):
        summary = tables["summary"] = lds_summary(curves, loo, records)
        for name, df in tables.items():
            df.to_csv(out / f"{name}.csv", index=False)
        save_text(out / "report.md", _report(title, summary, figures, list(tables), gold, targets, beside, undefined))
        save_json(out / "evaluated.json", {
            "run": str(run.path), "gold": str(run.gold_dir(key)), "seeds": gold.seeds,
            "final_model": gold.meta["final_model"], "gold_files": gold.files, "subsets": gold.meta["subsets"],
            "leave_one_out": {label: {"gold": str(run.gold_dir(k)), "gold_files": g.files, "seeds": g.seeds}
                              for label, (k, g) in beside.items()},
            "methods": {k: {"key": r.get("key"), "scores_sha256": r.get("scores_sha256")} for k, r in records.items()}})
    return tables, figures, x_name


def _report(title: str, summary: pd.DataFrame, figures: list[Path], tables: list[str], gold: SubsetGoldStandard,
            targets: dict, beside: dict, undefined: pd.DataFrame) -> str:
    """`report.md`: what was measured, the summary (and what in it is undefined, and why), the
    figures and the CSVs."""
    target = next(iter(targets))
    lines = [f"# {title}", "",
             f"The linear datamodeling score (docs/evaluation.md): per test instance, the Spearman correlation across "
             f"the {gold.masks.shape[0]} subsets of the sum of a method's scores over each subset with the subset "
             f"runs' {target} (`lds_{target}`) or negated test loss (`lds_loss`), averaged over the "
             f"{len(gold.seeds)} seed(s); then averaged over test instances (± its standard error). "
             f"`gold: ...` rows are leave-one-out gold standards over the whole training set used as linear "
             f"predictors.", ""]
    if beside:
        lines += ["LOO correlation (dattri's definition): per test instance, the Pearson correlation of a method's "
                  "scores with a leave-one-out gold standard's attribution, averaged over test instances; against "
                  + ", ".join(f"`{b}`" for b in beside) + ".", ""]
    else:
        lines += ["No complete leave-one-out gold standard of this final model and test instances exists in the run, "
                  "so no LOO correlation was computed (`tda-further-train` with the same overrides and "
                  "`gold_standard=further_training` or `retraining` computes one).", ""]
    cols = list(summary.columns)
    lines += ["## Summary", "", *md_table(cols, summary[cols].values.tolist()), "", *report_section(undefined),
              "## Figures", ""]
    lines += [f"![{p.stem}]({p.name})" for p in figures]
    lines += ["", "## Tables", "", *[f"- [{name}.csv]({name}.csv)" for name in tables], ""]
    return "\n".join(lines)
