"""The stages, each one module; the entry points (`train.py`, `attribute.py`, `evaluate.py`, the
`tda-*` console scripts of tda.cli) only parse the config and call them.

    stage          entry points                   module         writes (paths: tda.runs.RunDir)
    train          train.py, tda-train            final_model    the final and initial model, selection.json, ...
    further_train  tda-further-train, or          gold           gold/<key>/: the gold standard, seed by seed
                   attribute.py method=further_training
    attribute      attribute.py, tda-attribute    method_scores  methods/<key>/: one method's scores
    evaluate       evaluate.py, tda-evaluate      evaluation     eval/<key>/ (evaluate.compare: compare/<name>/)

Each stage checks the whole config first (tda.preflight.check_config), builds the typed sections
once and passes them down; what the stages share (the data, the model, the selection, the
attribution problem) is in :mod:`~tda.stages.inputs`. Each stage module also says what it has
kept on disk when interrupted (`kept`, collected in :data:`KEPT` for tda.interrupt).
"""

from __future__ import annotations

from collections.abc import Callable

from omegaconf import DictConfig

from tda.interrupt import Kept
from tda.stages import evaluation, final_model, gold, method_scores
from tda.stages.evaluation import evaluate
from tda.stages.final_model import train
from tda.stages.gold import further_train
from tda.stages.inputs import attribution_problem, build_model, load_data, select
from tda.stages.method_scores import attribute

__all__ = ["KEPT", "attribute", "attribution_problem", "build_model", "evaluate", "further_train", "load_data",
           "select", "train"]

# stage -> kept(cfg, started): what was running, what is on disk, how to resume (tda.interrupt)
KEPT: dict[str, Callable[[DictConfig, float], Kept]] = {
    "train": final_model.kept, "further_train": gold.kept, "attribute": method_scores.kept, "evaluate": evaluation.kept}
