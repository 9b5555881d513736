"""The evaluate flow of mislabel detection (`evaluate.py attribution.target=self`): every
self-influence computed for a final model trained on flipped labels (the methods', the loss
baseline's, the gold standard's self-effect), ranked against the flipped rows that selection.json
records (tda.evaluation.mislabel), written as one set into `eval/mislabel/` — `mislabel.csv`,
`detection_curve.csv`, `self_influence_agreement.csv`, `detection.png`, `report.md`,
`evaluated.json` — then logged to W&B."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from tda.artifacts import save_json, save_text
from tda.config import ConfigError
from tda.evaluation import plots
from tda.evaluation.loading import load_all_self_influence
from tda.evaluation.markdown import md_table
from tda.evaluation.mislabel import (
    INSPECTED,
    constant_sources,
    detection_curves,
    flipped_mask,
    found_column,
    mislabel_table,
    self_influence_agreement,
)
from tda.evaluation.output_set import output_set
from tda.evaluation.progress import Steps
from tda.evaluation.wandb_logging import log_mislabel_to_wandb
from tda.provenance import FinalModel
from tda.runs import RunDir

log = logging.getLogger(__name__)

KEY = "mislabel"  # eval/mislabel/


def evaluate_mislabel(cfg: DictConfig, run: RunDir, final: FinalModel) -> Path:
    """Mislabel detection for the final model of `run` into `eval/mislabel/` (returned). Refused
    when the run flipped no labels or holds no self-influence."""
    noise = final.selection.get("label_noise")
    if not noise:
        raise ConfigError(f"mislabel detection needs flipped training labels, but the final model in {run.path} was "
                          f"trained on the labels as loaded; train one with label noise, e.g. `python train.py "
                          f"<same overrides> label_noise.fraction=0.1`, and compute self-influence for it")
    n_train = int(final.selection["n_train"])
    steps = Steps("evaluate (mislabel detection)")
    with steps.step("loading", f"the self-influence of every method of {run.path.name}"):
        self_influence, records = load_all_self_influence(run, final.identity, n_train)
    if not self_influence:
        raise FileNotFoundError(f"no self-influence for the final model in {run.path}; compute it first with the same "
                                f"overrides, e.g. `python attribute.py -m method=loss,grad_dot,cg "
                                f"attribution.target=self`")
    flipped = flipped_mask(noise, n_train)
    title = (f"{run.path.name}: mislabel detection ({int(flipped.sum())} of {n_train} training labels flipped, "
             f"label_noise.fraction={noise['fraction']}, seed {noise['seed']})")
    out_dir = run.eval_dir(KEY)
    with output_set(out_dir) as staging:
        with steps.step("detection", f"AUC and flipped labels found, {len(self_influence)} sources"):
            tables = {"mislabel": mislabel_table(self_influence, flipped, records),
                      "detection_curve": detection_curves(self_influence, flipped),
                      "self_influence_agreement": self_influence_agreement(self_influence)}
            constant = constant_sources(self_influence)
            for said in constant.values():
                log.warning("undefined: %s", said)
            figures = [plots.plot_detection(tables["detection_curve"], staging / "detection.png", title=title,
                                            marks=INSPECTED)]
        with steps.step("writing", "tables, report.md"):
            for name, df in tables.items():
                df.to_csv(staging / f"{name}.csv", index=False)
            save_text(staging / "report.md", mislabel_report(title, tables, records, constant))
            save_json(staging / "evaluated.json", {
                "run": str(run.path), "final_model": final.identity, "label_noise": {
                    k: noise[k] for k in ("fraction", "seed", "n_flipped")},
                "self_influence": {k: {"key": r.get("key"), "scores_sha256": r.get("scores_sha256")}
                                   for k, r in records.items()}})
    with steps.step("W&B"):
        log_mislabel_to_wandb(cfg, f"{run.path.name}/evaluate/{KEY}", tables, [out_dir / f.name for f in figures],
                              constant)
    log.info("mislabel detection written to %s in %s", out_dir, steps.timings())
    return out_dir


def mislabel_report(title: str, tables: dict[str, pd.DataFrame], records: dict[str, dict],
                    constant: dict[str, str] | None = None) -> str:
    """`report.md`: the detection table, what its columns mean, the sources that rank nothing
    (`constant`: :func:`tda.evaluation.mislabel.constant_sources`), the agreement of the
    sources' rankings, links to every file."""
    table = tables["mislabel"]
    found = [found_column(p) for p in INSPECTED]
    lines = [f"# {title}", "", "## Detection", "",
             "Each source's self-influence ranks the training instances, highest first; a practitioner inspects them "
             "in that order. **AUC**: the probability that a flipped instance ranks above a clean one (0.5 = a random "
             "order, 1 = every flipped label first; dattri's `mislabel_detection_auc`). **found at p %**: the "
             "fraction of the flipped labels among the first p % of the training set inspected (a random order "
             "finds p %). `loss` is the plain baseline (each instance's own training loss).", ""]
    lines += md_table(["source", "AUC", *[f"found at {c.rsplit('_', 1)[1]} %" for c in found], "seconds"],
                      [[r["method"], r["auc"], *[r[c] for c in found], r["seconds"]] for _, r in table.iterrows()])
    lines.append("")
    if constant:
        lines += ["A source with no ranking (the `undefined` cells below are its):", ""]
        lines += [f"- {said}" for said in constant.values()] + [""]
    lines += ["![detection](detection.png)", ""]
    agreement = tables["self_influence_agreement"]
    if len(agreement):
        lines += ["## Agreement of the rankings", "",
                  "Spearman rank correlation of two sources' self-influence over the training set "
                  "(`self_influence_agreement.csv`):", ""]
        lines += md_table(["source A", "source B", "Spearman"], agreement.values.tolist())
        lines.append("")
    lines += ["## Files", "", "- `mislabel.csv`: the detection table; `detection_curve.csv`: found against inspected "
              "for every source (with `random` and `oracle`); `self_influence_agreement.csv`; `detection.png`; "
              "`evaluated.json`: the self-influence files read (by checksum) and the label noise.",
              "- Where each source came from: " + ", ".join(f"{k} (`self_influence/{r.get('key')}/`)"
                                                             for k, r in records.items()), ""]
    return "\n".join(lines)
