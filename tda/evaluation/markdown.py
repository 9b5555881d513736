"""Rendering of `report.md`, the page a reader opens first: tables with column names that say
what they are, a short glossary of the terms the paper would otherwise have to explain, and
links to every figure and CSV. The CSVs keep their short column names; the glossary gives
both."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tda.evaluation.diagnostics import adjustment_summary
from tda.evaluation.undefined import report_section


# ---------------------------------------------------------------------------------- markdown basics
def md_escape(s: str) -> str:
    """`s` safe inside a markdown table cell."""
    return s.replace("|", "\\|").replace("\n", " ")


UNDEFINED = "undefined"  # a table cell whose number is NaN: a mean over no test instance (tda.evaluation.undefined)


def md_table(cols: list[str], rows: list[list]) -> list[str]:
    """A markdown table (as lines); floats to 4 significant digits, NaN (and a missing integer)
    as the word `undefined`: the report says why beside the table (tda.evaluation.undefined)."""
    def cell(v):
        if v is pd.NA or (isinstance(v, (float, np.floating)) and np.isnan(v)):
            return UNDEFINED
        if isinstance(v, (float, np.floating)):
            return f"{v:.4g}"
        return md_escape(str(v))
    header = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return header + ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]


def centring(centered) -> str:
    """How the gold standard was compared: mean-centred over the left-out instances, or not."""
    return "centred" if bool(centered) else "not centred"


def _readable(df: pd.DataFrame, x_name: str) -> tuple[list[str], list[list]]:
    """The table's column names as a reader says them and its `centered` values as words."""
    cols = [_header(c, x_name) for c in df.columns]
    rows = [[centring(v) if c == "centered" else v for c, v in zip(df.columns, r)] for r in df.values.tolist()]
    return cols, rows


def _header(col: str, x_name: str) -> str:
    if col.startswith("precision_at_"):  # precision_at_<k>_<kind>
        k, kind = col[len("precision_at_"):].split("_", 1)
        return f"precision@{k} {kind}"
    if col.startswith("recall_") and "_in_top_m_" in col:  # recall_<k>_in_top_m_<kind>
        k, kind = col[len("recall_"):].split("_in_top_m_")
        return f"recall of gold top {k} in top m, {kind}"
    return {"centered": "gold standard", "peak_cosine": "peak cosine", "peak_checkpoint": "peak checkpoint",
            "peak_x": f"peak {x_name}", "cosine_first": "cosine, first", "cosine_last": "cosine, last",
            "spearman_first": "Spearman, first", "spearman_last": "Spearman, last",
            "spearman_skipped": "Spearman undefined", "seconds": "method seconds", "peak_mb": "method peak MB",
            "top_k_helpful_overlap": "top-k helpful overlap", "top_k_harmful_overlap": "top-k harmful overlap",
            "method_a": "method A", "method_b": "method B", "se": "SE", "n": "test instances",
            "n_skipped": "undefined", "seeds_per_half": "seeds per half", "projected_seeds": "projected to seeds",
            "precision_se": "precision SE", "recall_se": "recall SE", "norm_ratio": "norm ratio"}.get(col, col)


def _is_top_k_column(col: str) -> bool:
    return col.startswith("precision_at_") or (col.startswith("recall_") and "_in_top_m_" in col)


# ---------------------------------------------------------------------------------- glossary
def glossary(x_name: str, summary: pd.DataFrame, reliability: bool = True, seed_windows: bool = False,
             top_k: bool = False, gold_agreement: bool = False, derivative: bool = False, adjustment: bool = False,
             distance: bool = False, class_structure: bool = False) -> list[str]:
    """What the report's terms mean, for a reader without the paper (only those it uses)."""
    lines = [
        "## Glossary", "",
        "- **gold standard**: further training of the final model with a fresh optimizer, on all training data "
        "and once without each left-out instance, for several seeds (batch orders). A left-out instance's "
        "attribution for a test instance is the test loss without it minus the test loss with it, averaged over "
        "the seeds; positive = the instance helps that test instance.",
    ]
    if derivative:
        lines.append("- **derivative estimator** (`further_training.estimator=derivative`, this gold standard): "
                     "instead of training once without each instance, the full-data run is differentiated in the "
                     "instance's loss weight; the stored attribution is the first-order estimate of the same "
                     "difference (−Δw_j · ∂ loss / ∂w_j, docs/further_training.md), exact to rounding.")
    lines += [
        "- **centred / not centred** (CSV column `centered` = True / False): whether the gold standard's "
        "attributions are mean-centred over the left-out instances (per test instance, checkpoint and seed) "
        "before the comparison, as in the paper's figures. Centring removes what all left-out instances share. "
        "Method scores are never centred.",
        "- **cosine / Spearman**: per test instance, the cosine similarity / Spearman rank correlation between the "
        "gold standard's attributions and the method's scores over the left-out instances (1 = same direction / "
        "same order, 0 = unrelated). Every table and curve shows the **mean over test instances**, with **SE** "
        "its standard error.",
        f"- **checkpoint**: the gold standard is measured after every further-training {x_name}; `checkpoint` "
        f"counts them from 0 and `x` is the {x_name} itself.",
        f"- **peak cosine** (`peak_cosine`): the highest mean cosine over the checkpoints, reached at **peak "
        f"checkpoint** (`peak_checkpoint`), i.e. **peak {x_name}** (`peak_x`). With only the final model, no "
        "further-training length is the right one, so methods are compared at their best checkpoint.",
        "- **first / last** (`cosine_first`, `spearman_last`, ...): at the first and the last checkpoint.",
        "- **Spearman undefined** (`spearman_skipped`): (test instance, checkpoint) pairs left out of the mean "
        "because a vector is constant.",
        "- **method seconds / peak MB** (`seconds`, `peak_mb`): the method's wall time and peak memory when it "
        "computed its scores.",
    ]
    if "top_k_helpful_overlap" in summary.columns:
        lines.append("- **top-k helpful / harmful overlap**: the mean over test instances of the fraction of the "
                     "gold standard's k most helpful (harmful) left-out instances that the method also ranks in its "
                     "own top (bottom) k; see `examples.md`.")
    if top_k:
        lines.append("- **precision@k** (`precision_at_<k>_<kind>`, topk.csv `precision`): per test instance, the "
                     "fraction of the gold standard's k most helpful (largest attribution; `kind` helpful) or k most "
                     "harmful (smallest; harmful) left-out instances that the method also puts in its own top "
                     "(bottom) k, |top-k(method) ∩ top-k(gold)| / k; mean over test instances. At equal k, recall "
                     "(the fraction of the gold's top k found) is the same number, so **recall** "
                     "(`recall_<k>_in_top_m_<kind>`, topk.csv `recall`) looks for the gold's top k in the method's "
                     "top m = max(k, ⌈`evaluate.top_k_recall_within` × n_left_out⌉) (default: its top 10%): "
                     "|top-k(gold) ∩ top-m(method)| / k. k is capped at n_left_out, and a k that reaches it is left "
                     "out (both would be 1 by construction). "
                     "Summary columns are at the last checkpoint; topk.csv has every checkpoint. Centring does not "
                     "change the gold standard's order.")
    if gold_agreement:
        lines.append("- **gold vs gold** (gold_agreement.csv): this gold standard against gold standards of the same "
                     "final model and settings but another estimator or removal (e.g. the derivative estimator "
                     "against the `drop` and `mask` differences), per checkpoint: cosine, Spearman and the norm ratio "
                     "‖this‖ / ‖other‖ over the left-out instances, mean over test instances. Where they agree, the "
                     "first-order (linearised) gold standard measures what retraining without the instance does.")
    if reliability:
        lines.append("- **split-half reliability** (gold split-half, **k vs k seeds**; `seeds_per_half` = k): the "
                     "same similarity between two gold standards averaged over disjoint sets of k = ⌊n_seeds / 2⌋ "
                     "seeds each (with an odd number of seeds the last one is unused). It measures how reproducible "
                     "the gold standard is, a ceiling on how well any method can agree with it. **projected to n_seeds "
                     "seeds** (`projected`, at `projected_seeds` = n_seeds): its Spearman–Brown projection "
                     "sqrt(m·r / (1 + (m − 1)·r)), m = n_seeds / k, to the gold standard of all the seeds, the one "
                     "every method is scored against.")
    if seed_windows:
        lines.append("- **seeds averaged (K)**: the gold standard recomputed from K seeds only, once per "
                     "non-overlapping window of K seeds (`definition` in seed_windows.csv): **peak of the "
                     "window-averaged curve** (`peak_of_mean_curve`, the authors' definition, used where results "
                     "are compared with the paper): the similarity curves of the windows averaged checkpoint by "
                     "checkpoint, then the peak over checkpoints; **mean of the windows' peaks** "
                     "(`mean_of_window_peaks`): each window's own peak over checkpoints, averaged over the windows "
                     "(at least as high). A value still changing with K means more seeds would change the "
                     "comparison.")
    if adjustment:
        lines.append("- **adjusted / unadjusted** (adjustment.csv `adjusted`): the gold standard with eq. 17's "
                     "subtraction of the full-data run, loss(D∖j) − loss(D) (the default everywhere else), or without "
                     "it, loss(D∖j) − loss(θᶠ), both not centred (centring removes the difference). The two differ "
                     "by a shift shared by every left-out instance, so Spearman is the same for both by construction; "
                     "the adjustment shows in the cosine.")
    if distance:
        lines.append("- **distance from the start** (distance.csv): ‖θ_t − θ_start‖, how far the full-data "
                     "run has moved the trainable parameters by each checkpoint, mean over seeds.")
    if class_structure:
        lines.append("- **class structure** (class_structure.csv): per test instance, the mean score of the left-out "
                     "instances of its own class (`same_class`) and of the other classes (`other_class`), and the "
                     "cosine, both centred over the left-out instances, of the scores with the same-class indicator "
                     "[y_j = y_z] (`cosine_same_class`); mean over test instances. Positive = the scores say "
                     "same-class instances help.")
    return lines + [""]


# ---------------------------------------------------------------------------------- the reports
PEAK_DEFINITION_NAMES = {"peak_of_mean_curve": "peak of the window-averaged curve (authors')",
                         "mean_of_window_peaks": "mean of the windows' peaks"}


def evaluation_report(title: str, x_name: str, summary: pd.DataFrame, reliability: pd.DataFrame, peaks: pd.DataFrame,
                      agreement: pd.DataFrame, figures: list[Path], csvs: list[str], has_examples: bool,
                      topk: pd.DataFrame | None = None, gold_agreement: pd.DataFrame | None = None,
                      gold_name: str = "", gold_skipped: list[str] | None = None,
                      adjustment: pd.DataFrame | None = None, distance: pd.DataFrame | None = None,
                      class_structure: pd.DataFrame | None = None, task: str = "classification",
                      further_vs_retraining: pd.DataFrame | None = None, undefined: pd.DataFrame | None = None) -> str:
    """`report.md` of one evaluation: summary, the gold standard's top k, gold-standard
    reliability, gold vs gold (other estimators / removals), peak vs seeds averaged (both
    definitions), adjusted vs unadjusted gold standard, distance from the start, class
    structure (classification), method vs method, glossary, and links to the figures,
    `examples.md` and the CSVs. `distance` None: not recorded in the gold standard (said so);
    `class_structure` None: not computed (said so for a regression `task`); `undefined`
    (tda.evaluation.undefined): which numbers are undefined and why, said below the summary."""
    lines = [f"# {title}", "", "## Summary", "",
             "How well each method's scores agree with the gold standard (terms: see the glossary below).", ""]
    lines += md_table(*_readable(summary[[c for c in summary.columns if not _is_top_k_column(c)]], x_name))
    lines.append("")
    lines += report_section(undefined)
    has_top_k = topk is not None and len(topk) > 0
    if has_top_k:
        last = topk[topk.checkpoint == topk.checkpoint.max()]
        lines += ["## The gold standard's top k", "",
                  f"Per method, at the last checkpoint ({x_name} {last.x.iloc[0]:g}; every checkpoint in `topk.csv`): "
                  f"precision@k of the gold standard's k most helpful and k most harmful instances, and how many of "
                  f"them the method ranks within its top m (mean over test instances):", ""]
        lines += md_table(*_readable(last[["method", "kind", "k", "m", "precision", "precision_se", "recall",
                                           "recall_se"]], x_name))
        lines.append("")
    if gold_agreement is not None and len(gold_agreement):
        last = gold_agreement[gold_agreement.checkpoint == gold_agreement.checkpoint.max()]
        piv = last.pivot_table(index=["sibling", "centered"], columns="metric", values="mean").reset_index()
        lines += ["## Gold standard vs gold standard", "",
                  f"This gold standard ({gold_name}) against the gold standards of the same settings with another "
                  f"estimator or removal, at the last checkpoint ({x_name} {last.x.iloc[0]:g}; every checkpoint in "
                  f"`gold_agreement.csv` and `gold_agreement.png`):", ""]
        lines += md_table(["other gold standard", "gold standards", *piv.columns[2:]],
                          [[r[0], centring(r[1]), *r[2:]] for r in piv.values.tolist()])
        lines.append("")
    if further_vs_retraining is not None and len(further_vs_retraining):
        lines += ["## Further training vs retraining", "",
                  "This gold standard retrains every model from the initial weights; the methods and the "
                  "further-training gold standards are best read against its LAST checkpoint (the models retrained "
                  "in full: the summary's \"last\" columns). Each further-training gold standard of this final model "
                  "against it, at the further-training checkpoint where it agrees best (every checkpoint in "
                  "`further_vs_retraining.csv` and `.png`):", ""]
        rows = []
        for (label, metric, centered), g in further_vs_retraining.groupby(["method", "metric", "centered"], sort=False):
            last = g.sort_values("checkpoint")["mean"].iloc[-1]
            if g["mean"].isna().all():  # no checkpoint to name: the peak of nothing
                rows.append([label, metric, centring(centered), np.nan, np.nan, UNDEFINED, last])
                continue
            best = g.loc[g["mean"].idxmax()]
            rows.append([label, metric, centring(centered), best["mean"], best["se"], f"{best['x_name']} {best['x']:g}",
                         last])
        lines += md_table(["further training", "metric", "gold standards", "peak", "SE", "at", "last"], rows)
        lines.append("")
    if gold_skipped:
        lines += ["Gold standards of the same settings not compared:", ""] + [f"- {md_escape(w)}" for w in gold_skipped]
        lines.append("")
    if len(reliability):
        lines += _reliability_section(reliability, x_name)
    if len(peaks):
        lines += _peaks_section(peaks)
    if adjustment is not None and len(adjustment):
        lines += _adjustment_section(adjustment, x_name)
    lines += _distance_section(distance, x_name)
    if class_structure is not None and len(class_structure):
        lines += _class_structure_section(class_structure, x_name)
    elif task == "regression":
        lines += ["## Class structure", "", "Not computed: this is a regression task (no classes).", ""]
    if len(agreement):
        lines += ["## Method vs method", "",
                  "Mean similarity between two methods' scores over test instances (`agreement.csv`, "
                  "`agreement.png`):", ""]
        lines += md_table(*_readable(agreement, x_name))
        lines.append("")
    lines += glossary(x_name, summary, reliability=len(reliability) > 0, seed_windows=len(peaks) > 0, top_k=has_top_k,
                      gold_agreement=gold_agreement is not None and len(gold_agreement) > 0,
                      derivative=gold_name.startswith("derivative"),
                      adjustment=adjustment is not None and len(adjustment) > 0, distance=distance is not None,
                      class_structure=class_structure is not None and len(class_structure) > 0)
    lines += ["## Figures", ""] + [f"![{f.stem}]({f.name})" for f in figures] + [""]
    if has_examples:
        lines += ["Most helpful / harmful instances, rendered: [examples.md](examples.md)", ""]
    lines += ["## Data", ""] + [f"- [{c}]({c})" for c in sorted(csvs)] + [""]
    return "\n".join(lines)


def _reliability_section(reliability: pd.DataFrame, x_name: str) -> list[str]:
    last = reliability[reliability.checkpoint == reliability.checkpoint.max()]
    k, projected = int(reliability.seeds_per_half.iloc[0]), int(reliability.projected_seeds.iloc[0])
    lines = ["## Gold standard reliability", "",
             f"Similarity between two gold standards averaged over disjoint halves of the seeds ({k} vs {k} seeds) at "
             f"the last checkpoint ({x_name} {last.x.iloc[0]:g}) — the dashed ceiling in `similarity.png` — and its "
             f"Spearman–Brown projection to {projected} seeds:", ""]
    cols, rows = _readable(last[["metric", "centered", "mean", "se", "projected"]], x_name)
    cols[2], cols[4] = f"{k} vs {k} seeds", f"projected to {projected} seeds"
    return lines + md_table(cols, rows) + [""]


def _peaks_section(peaks: pd.DataFrame) -> list[str]:
    """Peak cosine against K, one row per method, centring and definition (the authors' first)."""
    cos = peaks[peaks.metric == "cosine"]
    lines = ["## Peak cosine vs seeds averaged", "",
             "Peak cosine over the checkpoints when the gold standard averages K seeds, over non-overlapping windows "
             "of K seeds, by two definitions: the peak of the window-averaged curve (the authors', used to compare "
             "with the paper) and the mean of the windows' own peaks (`seed_windows.csv`, `seed_windows.png`):", ""]
    ks = sorted(cos.n_seeds_averaged.unique())
    rows = []
    for definition in PEAK_DEFINITION_NAMES:
        sub = cos[cos.definition == definition]
        piv = sub.pivot_table(index=["method", "centered"], columns="n_seeds_averaged", values="peak_mean")
        for (method, centered), r in piv.iterrows():
            rows.append([method, centring(centered), PEAK_DEFINITION_NAMES[definition], *[r.get(k) for k in ks]])
    return lines + md_table(["method", "gold standard", "definition"] + [f"K = {k}" for k in ks], rows) + [""]


def _adjustment_section(adjustment: pd.DataFrame, x_name: str) -> list[str]:
    last_x = adjustment.x.max()
    lines = ["## Adjusted vs unadjusted gold standard", "",
             f"Each method against the gold standard with eq. 17's subtraction of the full-data run (adjusted, "
             f"loss(D∖j) − loss(D)) and without it (unadjusted, loss(D∖j) − loss(θᶠ)), both not centred; at the last "
             f"checkpoint ({x_name} {last_x:g}) and the peak over checkpoints, mean over test instances (every "
             f"checkpoint with SE in `adjustment.csv`, `adjustment.png`):", ""]
    summ = adjustment_summary(adjustment)
    cols = ["method", "metric", "adjusted, last", "unadjusted, last", "adjusted, peak", "unadjusted, peak"]
    return lines + md_table(cols, summ.values.tolist()) + [""]


def _distance_section(distance: pd.DataFrame | None, x_name: str) -> list[str]:
    lines = ["## Distance from the start", ""]
    if distance is None:
        return lines + ["The gold standard does not record ‖θ_t − θ_start‖ (it was computed before the distance was "
                        "recorded), so `distance.csv` is not written.", ""]
    lines += [f"‖θ_t − θ_start‖ (θ_start: the final model, or the initial weights when retraining) of the full-data "
              f"run per checkpoint, mean ± SE over {int(distance.n_seeds.iloc[0])} seeds (`distance.csv`, "
              f"`distance.png`):", ""]
    return lines + md_table([x_name, "distance", "SE"], distance[["x", "mean", "se"]].values.tolist()) + [""]


def _class_structure_section(cs: pd.DataFrame, x_name: str) -> list[str]:
    gold = cs[cs.source == "gold standard"]
    last = gold[gold.checkpoint == gold.checkpoint.max()]
    methods = cs[cs.source != "gold standard"]
    lines = ["## Class structure", "",
             f"Whether a left-out instance of the test instance's own class scores differently from the others: the "
             f"mean score of own-class and other-class left-out instances and the centred cosine of the scores with "
             f"the same-class indicator, mean over test instances; the gold standard at the last checkpoint "
             f"({x_name} {last.x.iloc[0]:g}; every checkpoint in `class_structure.csv`):", ""]
    cols = ["scores", "gold standard", "own class", "other classes", "own − other", "cosine with same class", "SE",
            "test instances", "undefined"]
    rows = [[r.source, centring(r.centered) if r.source == "gold standard" else "", r.same_class, r.other_class,
             r.difference, r.cosine_same_class, r.cosine_same_class_se, int(r.n), int(r.n_undefined)]
            for _, r in pd.concat([last, methods]).iterrows()]
    return lines + md_table(cols, rows) + [""]


def compare_report(title: str, x_name: str, experiments: dict[str, list[str]], summary: pd.DataFrame,
                   figure: Path, csvs: list[str], undefined: pd.DataFrame | None = None) -> str:
    """`report.md` of a comparison: the experiments (override string -> run directories), the
    summary per experiment and method, what is undefined and why, the glossary, the figure and
    the CSVs."""
    lines = [f"# {title}", "",
             "Experiments: each is the evaluate config composed from this run's overrides followed by the entry's "
             "(as if appended to the command line):", ""]
    lines += [f"- `{e}`: " + ", ".join(f"`{r}`" for r in runs) for e, runs in experiments.items()]
    lines += ["", "## Summary", ""] + md_table(*_readable(summary, x_name)) + [""] + report_section(undefined)
    lines += glossary(x_name, summary)
    lines += [f"![{figure.stem}]({figure.name})", "",
              "Colour = method, line style = experiment; black = the experiment's gold split-half reliability.", "",
              "Data: " + ", ".join(f"[{c}]({c})" for c in csvs), ""]
    return "\n".join(lines)
