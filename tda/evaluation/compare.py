"""The compare flow: several experiments (e.g. SGD vs Adam further training, or several
further-training settings) in one figure and table.

`evaluate.compare` lists override strings; each experiment is the config Hydra composes from
the entry point's config with this run's overrides followed by the entry's, exactly as if they
were appended to the command line. Its final model, gold standard and methods must already
exist. Inside `python evaluate.py` the overrides are the running app's (Hydra's
`HydraConfig`); a caller outside a Hydra app passes them.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shlex
from pathlib import Path

import pandas as pd
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig

from tda.artifacts import save_text
from tda.config import ConfigError, config_hash
from tda.evaluation import plots
from tda.evaluation.curves import gold_attribution, similarity_curves, split_half_reliability, summary_table
from tda.evaluation.loading import load_experiment
from tda.evaluation.markdown import compare_report
from tda.evaluation.metrics import METRICS
from tda.evaluation.output_set import output_set
from tda.evaluation.progress import Steps
from tda.evaluation.settings import EvaluateSettings
from tda.evaluation.undefined import say_undefined, series_notes, similarity_undefined
from tda.evaluation.wandb_logging import log_to_wandb
from tda.further_training.store import GoldStandardSpec
from tda.runs import RunDir, check_names, compare_dir

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
CONFIG_NAME = "evaluate"  # the evaluate entry point's config


# ---------------------------------------------------------------------------------- composing an experiment
def running_app_overrides() -> list[str]:
    """The overrides of the running Hydra app (its command line's, or its multirun job's)."""
    if not HydraConfig.initialized():
        raise ValueError("evaluate.compare composes each experiment from this run's overrides followed by the "
                         "entry's; outside `python evaluate.py` pass the overrides the config was composed from "
                         "(tda.stages.evaluate(cfg, overrides=[...]))")
    return list(HydraConfig.get().overrides.task)


def compose_experiment(base_overrides: list[str], entry: str) -> DictConfig:
    """The evaluate config of `base_overrides` followed by the entry's space-separated overrides
    (`further_optimizer=adam further_training.epochs=5`), composed by Hydra. An entry token that
    is not an override, or names no config key, is refused (ConfigError) with the entry named."""
    overrides = shlex.split(entry)
    parser = OverridesParser.create()
    for token in overrides:
        try:
            parser.parse_override(token)
        except HydraException as err:
            raise ConfigError(f"evaluate.compare entry {entry!r}: {token!r} is not a Hydra override (key=value, "
                             f"group=option, +key=value or ~key): {_one_line(err)}") from None
    try:
        return _compose([*base_overrides, *overrides])
    except HydraException as err:
        raise ConfigError(f"evaluate.compare entry {entry!r}: {_one_line(err)}") from None


def _compose(overrides: list[str]) -> DictConfig:
    """Hydra's compose API: inside a running app its GlobalHydra (the app's config search path)
    is already initialized and is used as is; elsewhere the repository's conf/ for this call."""
    if GlobalHydra.instance().is_initialized():
        return compose(config_name=CONFIG_NAME, overrides=overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=CONFIG_NAME, overrides=overrides)


def _one_line(err: Exception) -> str:
    """Hydra's multi-line message on one line."""
    return " ".join(str(err).split()) or type(err).__name__


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=,-]+", "_", s).strip("_")[:60] or "base"


# ---------------------------------------------------------------------------------- the flow
def evaluate_compare(cfg: DictConfig, settings: EvaluateSettings, overrides: list[str] | None = None) -> Path:
    """One figure and table across experiments: `evaluate.compare` (of `settings`, the `evaluate`
    section of `cfg`) lists override strings, each composed after `overrides` (default: the
    running Hydra app's) to find a final model, its gold standard and its methods (which must
    already exist). Lines are `<experiment> / <method>`. Written as one set into
    `runs/compare/<name>-<hash>/` (see `output_set`), then logged to W&B."""
    check_names(cfg)  # `name` names the output directory: refuse an unsafe one before any work
    entries = list(settings.compare)
    base = list(overrides) if overrides is not None else running_app_overrides()
    centering = tuple(settings.centering)
    wanted = settings.compare_methods
    all_curves, all_rel, all_undefined, all_records, x_names = [], [], [], {}, set()
    steps = Steps("compare")
    composed = [(entry, compose_experiment(base, entry)) for entry in entries]  # a bad entry fails before any work
    for entry, sub in composed:
        label = entry or "base"
        with steps.step(f"experiment {label!r}", "loading, similarity curves, split-half reliability"):
            run, spec = RunDir.from_config(sub), GoldStandardSpec.from_config(sub)  # each entry's own sections
            gold, scores, records = load_experiment(spec, run)
            if wanted:
                scores = {k: v for k, v in scores.items() if k in set(wanted)}
            if not scores:
                raise FileNotFoundError(f"evaluate.compare entry {entry!r}: no method scores in {run.path} "
                                        f"(compare_methods={list(wanted) if wanted else 'all'})")
            x_name, xs = gold.checkpoint_axis()
            x_names.add(x_name)
            c = similarity_curves(gold, scores, centering)
            c.insert(0, "experiment", label)
            all_curves.append(c)
            why = similarity_undefined(gold, scores, tuple(METRICS), centering)
            all_undefined.append(why[why.analysis == "similarity"].assign(method=label + " / " + why.method))
            rel = split_half_reliability(gold_attribution(gold), len(gold.seeds), x_name, xs, centering)
            rel.insert(0, "experiment", label)
            all_rel.append(rel)
            all_records.update({(label, k): v | {"run": str(run.path), "gold": str(run.gold_dir(spec.key))}
                                for k, v in records.items()})
    if len(x_names) > 1:
        raise ConfigError(f"evaluate.compare mixes checkpoint axes {sorted(x_names)}; compare experiments that "
                          f"checkpoint the same way (all per epoch or all every k steps)")
    x_name = x_names.pop()
    curves = pd.concat(all_curves, ignore_index=True)
    reliability = pd.concat(all_rel, ignore_index=True)
    name = cfg.name if cfg.get("name") is not None else "unnamed"
    out_dir = compare_dir(cfg, f"{name}-{config_hash(entries, dataclasses.asdict(settings))}")
    summary = summary_table(curves, all_records, by=("experiment", "method"))
    undefined = pd.concat(all_undefined, ignore_index=True)
    say_undefined(undefined)
    with steps.step("writing", "tables, similarity.png, report.md"), output_set(out_dir) as out:
        curves.to_csv(out / "similarity.csv", index=False)
        reliability.to_csv(out / "reliability.csv", index=False)
        summary.to_csv(out / "summary.csv", index=False)
        undefined.to_csv(out / "undefined.csv", index=False)
        plot_df = curves.assign(series=curves.experiment + " / " + curves.method)
        rel_lines = reliability.assign(series=reliability.experiment + " / gold split-half", method="gold_split_half")
        both = pd.concat([plot_df, rel_lines[[c for c in plot_df.columns if c in rel_lines.columns]]],
                         ignore_index=True)
        title = f"comparison: {' vs '.join(e or 'base' for e in entries)}"
        figure = plots.plot_curves(both, out / "similarity.png", title=title, series="series", style_by="experiment",
                                   notes=series_notes(undefined))
        experiments = {e or "base": sorted({r["run"] for (lab, _), r in all_records.items() if lab == (e or "base")})
                       for e in entries}
        save_text(out / "report.md", compare_report(title, x_name, experiments, summary, figure,
                                                    ["similarity.csv", "reliability.csv", "summary.csv",
                                                     "undefined.csv"], undefined))
    # W&B reads the figures from their final place: the staging directory no longer exists
    with steps.step("W&B"):
        log_to_wandb(cfg, f"compare/{name}/{_slug('_vs_'.join(entries))}",
                     {"similarity": curves, "summary": summary, "undefined": undefined}, [out_dir / figure.name],
                     x_name, series=("experiment", "method"))
    log.info("comparison written to %s in %s", out_dir, steps.timings())
    return out_dir
