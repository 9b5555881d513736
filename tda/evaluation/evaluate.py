"""The evaluate flow for one final model: load the gold standard and every method's scores,
run every analysis of docs/method.md (Evaluation), write the results (CSV + PNG + a markdown
report linking them) as one set, then log the same numbers to W&B.

The files of one evaluation are written as one set (`output_set`): into a staging directory
that is swapped into place only when every file is complete, so the output directory never
mixes two evaluations and never holds a truncated file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig

from tda.artifacts import save_json, save_text
from tda.config import node_name
from tda.data.base import DataBundle
from tda.evaluation import plots
from tda.evaluation.curves import (
    gold_attribution,
    method_agreement,
    resolve_checkpoints,
    seed_window_peaks,
    similarity_curves,
    sorted_scores,
    split_half_reliability,
    summary_table,
)
from tda.evaluation.diagnostics import (
    adjustment_curves,
    class_structure,
    distance_from_start,
    further_training_vs_retraining,
    gold_agreement,
    same_class,
)
from tda.evaluation.examples import examples
from tda.evaluation.loading import load_data, load_experiment
from tda.evaluation.markdown import evaluation_report
from tda.evaluation.metrics import METRICS
from tda.evaluation.output_set import output_set
from tda.evaluation.progress import Steps
from tda.evaluation.settings import EvaluateSettings
from tda.evaluation.top_k import top_k_agreement, top_k_summary
from tda.evaluation.undefined import (
    agreement_undefined,
    class_structure_undefined,
    gold_comparisons_undefined,
    say_undefined,
    series_notes,
    similarity_undefined,
)
from tda.evaluation.wandb_logging import log_to_wandb
from tda.further_training.attribution import GoldStandard
from tda.further_training.related import further_training_beside, gold_label, sibling_gold_standards
from tda.further_training.store import GoldStandardSpec
from tda.provenance import FinalModel, read_final_model
from tda.runs import RunDir

log = logging.getLogger(__name__)


def evaluate_run(cfg: DictConfig, settings: EvaluateSettings, spec: GoldStandardSpec, run: RunDir,
                 final: FinalModel | None = None) -> Path:
    """Evaluate every method of `run` against the gold standard `spec`, as `settings` say; returns
    `eval/<key>/`, which is replaced as one set (see `output_set`) and only then logged to W&B.
    `cfg`: the composed config (its dataset and model, the W&B logger)."""
    key = spec.key  # the gold standard's, and so this evaluation's, directory name
    steps = Steps("evaluate")
    with steps.step("loading", f"the gold standard {key} and the method scores of {run.path.name}"):
        final = final if final is not None else read_final_model(run)
        gold, scores, records = load_experiment(spec, run, final)
    if not scores:
        raise FileNotFoundError(f"no method scores for the final model in {run.path}; run e.g. "
                                f"`python attribute.py method=grad_dot` with the same overrides first")
    with steps.step("loading", f"the dataset {node_name(cfg.dataset, key='dataset')} (labels, targets, examples)"):
        data = load_data(cfg, run, final)
    with steps.step("loading", "sibling gold standards (another estimator or removal, otherwise the same)"):
        siblings, skipped = sibling_gold_standards(gold, run, key)
        for why in skipped:
            log.warning("not comparing with the gold standard %s", why)
    out_dir = run.eval_dir(key)
    with output_set(out_dir) as staging:
        tables, figures, x_name = _write_evaluation(cfg, settings, run, gold, scores, records, key, staging, steps,
                                                    data, final.state_dict, siblings, skipped)
    # W&B reads the files from their final place: the staging directory no longer exists
    with steps.step("W&B"):
        log_to_wandb(cfg, f"{run.path.name}/evaluate/{key}", tables, [out_dir / f.name for f in figures], x_name)
    log.info("evaluation written to %s in %s", out_dir, steps.timings())
    return out_dir


def _write_evaluation(cfg: DictConfig, settings: EvaluateSettings, run: RunDir, gold: GoldStandard,
                      scores: dict[str, torch.Tensor],
                      records: dict[str, dict], key: str, out: Path, steps: Steps, data: DataBundle,
                      final_weights: dict[str, torch.Tensor],
                      siblings: dict[str, tuple[str, GoldStandard]] | None = None, skipped: list[str] | None = None
                      ) -> tuple[dict[str, pd.DataFrame], list[Path], str]:
    """Run every analysis and write all of its files into `out` (a staging directory); returns
    the tables, the figures written and the name of the checkpoint axis, for W&B. `scores`:
    [n_test, n_left_out] per method label; `data`, `final_weights`: the final model's dataset
    and weights; `siblings`: the gold standards of the same settings but another estimator /
    removal (label -> (key, gold standard)), `skipped`: why others with those settings were
    not compared."""
    siblings, skipped = siblings or {}, skipped or []
    centering = tuple(settings.centering)
    x_name, xs = gold.checkpoint_axis()
    n_seeds = len(gold.seeds)
    attribution = gold_attribution(gold)

    title = f"{run.path.name} vs {gold.kind} ({key}, {n_seeds} seeds, {len(gold.meta['test_indices'])} test instances)"
    tables: dict[str, pd.DataFrame] = {}
    figures: list[Path] = []
    size = (f"{len(scores)} methods, {len(gold.meta['test_indices'])} test x {len(gold.meta['left_out_indices'])} "
            f"left-out instances, {gold.n_checkpoints} checkpoints, {n_seeds} seeds")
    with steps.step("similarity curves", f"and the gold standard's split-half reliability; {size}"):
        curves = similarity_curves(gold, scores, centering=centering)
        reliability = split_half_reliability(attribution, n_seeds, x_name, xs, centering)
        undefined = pd.concat([similarity_undefined(gold, scores, tuple(METRICS), centering),
                               agreement_undefined(scores, tuple(METRICS))], ignore_index=True)
        tables["similarity"], tables["reliability"], tables["undefined"] = curves, reliability, undefined
        say_undefined(undefined)
        figures.append(plots.plot_curves(curves, out / "similarity.png", title=title, reliability=reliability,
                                         notes=series_notes(undefined)))

    ks = settings.seed_windows
    fitting = ", ".join(str(k) for k in sorted(set(ks)) if 0 < k <= n_seeds)
    with steps.step("seed windows", f"peak similarity vs seeds averaged, K = {fitting}"):
        peaks = seed_window_peaks(attribution, n_seeds, scores, ks, centering)
        tables["seed_windows"] = peaks
        if len(peaks):
            figures.append(plots.plot_seed_windows(peaks, out / "seed_windows.png",
                                                   title=f"peak similarity vs seeds averaged — {title}",
                                                   notes=series_notes(undefined)))

    adjustment, distance, class_struct = _diagnostics(gold, scores, data, centering, title, out, steps, tables,
                                                      figures)

    with steps.step("sorted scores and agreement", "method vs method"):
        cps = resolve_checkpoints(settings.sorted_checkpoints, gold.n_checkpoints)
        srt = sorted_scores(gold, scores, cps, centering)
        tables["sorted_scores"] = srt
        figures.append(plots.plot_sorted_scores(srt, out / "sorted_scores.png", title=f"sorted scores — {title}",
                                                x_name=x_name))
        agreement = method_agreement(scores)
        tables["agreement"] = agreement
        if len(agreement):
            figures.append(plots.plot_agreement(agreement, list(scores), out / "agreement.png",
                                                title="method vs method"))

    ks = settings.top_k
    n_left_out = len(gold.meta["left_out_indices"])
    with steps.step("top k", f"precision@k and recall of the gold standard's top k, k = {ks} "
                             f"(capped at {n_left_out})"):
        topk = top_k_agreement(gold, scores, ks, settings.top_k_recall_within)
        tables["topk"] = topk

    gold_name = gold_label(gold.meta["further_training"])
    gold_agr = None
    if siblings:
        with steps.step("gold vs gold", f"{gold_name} against " + ", ".join(siblings)):
            gold_agr = gold_agreement(gold, gold_name, siblings, centering)
            tables["gold_agreement"] = gold_agr
            figures.append(plots.plot_curves(gold_agr, out / "gold_agreement.png", series="sibling",
                                             title=f"gold standard {gold_name} ({key}) vs the same settings with "
                                                   f"another estimator / removal"))

    further: dict[str, GoldStandard] = {}
    if gold.kind == "retraining":
        further, why = further_training_beside(gold, run)
        for reason in why:
            log.warning("not comparing with the further-training gold standard %s", reason)
        if further:
            with steps.step("further training vs retraining", ", ".join(further)):
                vs = tables["further_vs_retraining"] = further_training_vs_retraining(gold, further, centering)
                figures.append(plots.plot_curves(vs, out / "further_vs_retraining.png",
                                                 title=f"further training vs retraining (its last checkpoint) — "
                                                       f"{title}"))

    undefined = gold_comparisons_undefined(gold, tuple(METRICS), centering, {k: g for k, (_, g) in siblings.items()},
                                           further)
    say_undefined(undefined)
    tables["undefined"] = pd.concat([tables["undefined"], undefined], ignore_index=True)

    examples_md, overlap = "", {}
    if settings.examples.shown:
        with steps.step("examples"):
            tables["examples"], examples_md, example_figs, overlap = examples(settings.examples, cfg.model, gold,
                                                                              scores, out, data, final_weights)
            figures += example_figs

    with steps.step("writing", "tables, report.md"):
        summary = summary_table(curves, records, overlap, topk=top_k_summary(topk))
        tables["summary"] = summary
        for name, df in tables.items():
            df.to_csv(out / f"{name}.csv", index=False)
        if examples_md:
            save_text(out / "examples.md", examples_md)
        save_text(out / "report.md", evaluation_report(title, x_name, summary, reliability, peaks, agreement, figures,
                                                       [f"{name}.csv" for name in tables], bool(examples_md),
                                                       topk=topk, gold_agreement=gold_agr, gold_name=gold_name,
                                                       gold_skipped=skipped, adjustment=adjustment, distance=distance,
                                                       class_structure=class_struct, task=data.task,
                                                       further_vs_retraining=tables.get("further_vs_retraining"),
                                                       undefined=tables["undefined"]))
        # what this evaluation was computed from, by content
        save_json(out / "evaluated.json", {"run": str(run.path), "gold": str(run.gold_dir(key)), "seeds": gold.seeds,
                                           "final_model": gold.meta["final_model"], "gold_files": gold.files,
                                           "gold_siblings": {k: {"label": label, "gold": str(run.gold_dir(k)),
                                                                 "gold_files": g.files}
                                                             for label, (k, g) in siblings.items()},
                                           "methods": {k: {"key": r.get("key"), "scores_sha256": r.get("scores_sha256")}
                                                       for k, r in records.items()}})
    return tables, figures, x_name


def _diagnostics(gold: GoldStandard, scores: dict[str, torch.Tensor], data: DataBundle, centering: tuple[bool, ...],
                 title: str, out: Path, steps: Steps, tables: dict[str, pd.DataFrame], figures: list[Path]
                 ) -> tuple[pd.DataFrame, pd.DataFrame | None, pd.DataFrame | None]:
    """The gold standard's diagnostics (tda.evaluation.diagnostics), each table added to
    `tables` and its figure written into `out` and added to `figures`: adjusted vs unadjusted;
    the distance from the start (None: not recorded); class structure (None: regression)."""
    with steps.step("adjusted vs unadjusted", "every method against the uncentred gold standard with and without "
                                              "eq. 17's subtraction of the full-data run"):
        adjustment = tables["adjustment"] = adjustment_curves(gold, scores)
        figures.append(plots.plot_adjustment(adjustment, out / "adjustment.png",
                                             title=f"adjusted vs unadjusted gold standard — {title}"))
    distance = distance_from_start(gold)
    if distance is not None:
        tables["distance"] = distance
        figures.append(plots.plot_distance(distance, out / "distance.png",
                                           title=f"distance from the start — {title}"))
    if data.task != "classification":
        return adjustment, distance, None
    with steps.step("class structure", "own class vs other classes, cosine with the same-class indicator"):
        (_, y_train), (_, y_test) = data.tensors("train"), data.tensors("test")
        y_left_out, y_tested = y_train[gold.meta["left_out_indices"]], y_test[gold.meta["test_indices"]]
        structure = tables["class_structure"] = class_structure(gold, scores, y_left_out, y_tested, centering)
        why = class_structure_undefined(gold, scores, same_class(y_left_out, y_tested), centering)
        say_undefined(why)
        tables["undefined"] = pd.concat([tables["undefined"], why], ignore_index=True)
        figures.append(plots.plot_class_structure(structure, out / "class_structure.png",
                                                  title=f"class structure — {title}",
                                                  notes=series_notes(why, "class structure")))
    return adjustment, distance, structure
