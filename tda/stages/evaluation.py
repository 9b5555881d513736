"""The evaluate stage: every method of a final model against its gold standard, written into
`eval/<key>/` (tda.evaluation), or with `evaluate.compare` several experiments in one figure, or
with `attribution.target=self` mislabel detection by every self-influence, into `eval/mislabel/`."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from tda.config import ConfigError
from tda.evaluation.compare import evaluate_compare
from tda.evaluation.evaluate import evaluate_run
from tda.evaluation.evaluate_lds import evaluate_lds_run
from tda.evaluation.evaluate_mislabel import evaluate_mislabel
from tda.exits import require_writable_directory
from tda.further_training.store import GoldStandardSpec
from tda.interrupt import Kept
from tda.preflight import check_config
from tda.provenance import read_final_model
from tda.runs import RunDir


def evaluate(cfg: DictConfig, overrides: list[str] | None = None) -> Path:
    """Evaluate the methods of this final model, or with `evaluate.compare` several experiments,
    each composed from `overrides` (default: the running Hydra app's) plus its own, or with
    `attribution.target=self` their self-influence as mislabel detection."""
    settings = check_config(cfg, "evaluate")
    if settings.evaluate.compare:
        if settings.further_training.runs == "subsets":
            raise ConfigError("evaluate.compare sets the similarity curves of several experiments side by side; the "
                              "linear datamodeling score (further_training.runs=subsets) is evaluated one experiment "
                              "at a time: leave evaluate.compare empty")
        return evaluate_compare(cfg, settings.evaluate, overrides)  # each experiment composed from its own overrides
    run = RunDir.from_config(cfg, settings)
    require_writable_eval(run)
    if settings.attribution.target == "self":  # mislabel detection by every self-influence of the final model
        return evaluate_mislabel(cfg, run, read_final_model(run))
    spec = GoldStandardSpec.from_config(cfg, settings.further_training)
    if settings.further_training.runs == "subsets":  # the linear datamodeling score and LOO correlation
        return evaluate_lds_run(cfg, spec, run, read_final_model(run))
    return evaluate_run(cfg, settings.evaluate, spec, run, read_final_model(run))


def require_writable_eval(run: RunDir) -> None:
    """Refuse, before anything is loaded, a run whose `eval/` cannot be written (a read-only copy
    of a run, say): the evaluation's outputs have their one place in the run directory."""
    require_writable_directory(run.eval_root, "evaluate writes its tables, figures and report",
                               f"copy the run directory {run.path} to writable storage and point TDA_RUNS_DIR at the "
                               f"copy (the evaluation's outputs have no other place), or make it writable")


def kept(cfg: DictConfig, started: float) -> Kept:
    """What an interrupted evaluate stage leaves: the inputs unchanged, and the previous
    evaluation (its outputs are swapped in as one set, tda.evaluation.output_set)."""
    run = RunDir.from_config(cfg)
    return Kept("evaluation", f"the final model, gold standard and method scores in {run.path} are unchanged",
                "re-run the same command to evaluate again")
