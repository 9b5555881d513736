"""The attribute stage: one gradient-based method's scores [n_test, n_left_out] for the final
model, written into `methods/<key>/` (tda.scores), or with `attribution.target=self` its
self-influence of every training instance [n_train], written into `self_influence/<key>/`."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from tda.artifacts import remove_stale_temp_files
from tda.config import build, node_name, to_container
from tda.exits import WRITABLE_RUNS_FIX, require_writable_directory
from tda.interrupt import Kept
from tda.memory import PeakMemory
from tda.methods.base import Method
from tda.preflight import check_config
from tda.problem import AttributionSettings
from tda.provenance import read_final_model, stamp
from tda.runs import RunDir, method_key
from tda.scores import load_method_scores, save_method_scores, scores_complete
from tda.stages import gold
from tda.stages.inputs import attribution_problem
from tda.tracking import finish, init_wandb, mark_cached

log = logging.getLogger(__name__)


def runs_gold_standard(cfg: DictConfig) -> bool:
    """Whether `method` is the alias of the gold-standard stage (`method=further_training`: its
    config declares `stage: further_train`) rather than a method."""
    return cfg.method.get("stage") == "further_train"


def attribute(cfg: DictConfig) -> Path:
    """One method's scores [n_test, n_left_out] for the final model, into `methods/<key>/`, or with
    `attribution.target=self` its self-influence of every training instance [n_train], into
    `self_influence/<key>/`; returns that directory. `method=further_training` is no method: its
    config declares `stage: further_train`, and the gold-standard stage runs instead
    (tda.stages.gold.further_train), so that `attribute.py method=further_training` and sweeps such as
    `-m method=further_training,grad_dot` keep working."""
    if runs_gold_standard(cfg):
        return gold.further_train(cfg, stage="attribute")
    settings = check_config(cfg, "attribute")
    run = RunDir.from_config(cfg, settings)
    remove_stale_temp_files(run.path)
    final = read_final_model(run)  # fail before building anything else
    method = build(cfg.method)
    problem = attribution_problem(cfg, settings, run, final=final)
    name = node_name(cfg.method)
    self_influence = settings.attribution.target == "self"
    wb = init_wandb(cfg, "attribute", f"{run.path.name}/{name}" + ("/self_influence" if self_influence else ""))
    try:
        if not isinstance(method, Method):
            raise TypeError(f"method={name}: {type(method).__name__} is not a tda.methods.base.Method")
        if self_influence:
            out, expected, what = run.self_influence_dir(method_key(cfg)), (problem.n_train,), "[n_train]"
        else:
            out = run.method_dir(cfg)
            expected, what = (len(problem.test_indices), len(problem.left_out_indices)), "[n_test, n_left_out]"
        if scores_complete(out):
            load_method_scores(out, final.identity, expected)  # verified, and computed for this final model
            log.info("%s of %s already in %s", "self-influence" if self_influence else "scores", name, out)
            mark_cached(wb)
            return out
        kind = "self-influence" if self_influence else "scores"
        require_writable_directory(out, f"attribute writes the {kind} of {name}", WRITABLE_RUNS_FIX)
        torch.manual_seed(settings.seed)
        problem.model.to(problem.device)  # methods run where the model is; data moves chunk by chunk
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            scores = (method.self_influence(problem) if self_influence else method.scores(problem)).cpu()
            seconds = time.perf_counter() - t0
        if tuple(scores.shape) != expected:
            raise ValueError(f"method {name} returned {'self-influence' if self_influence else 'scores'} of shape "
                             f"{tuple(scores.shape)}, expected {what} = {expected}")
        header = {"method": name, "config": to_container(cfg.method), "final_model": final.identity,
                  "shape": list(expected)}
        indices = ({"target": "self", "n_train": problem.n_train} if self_influence else
                   {"left_out_indices": problem.left_out_indices.tolist(),
                    "test_indices": problem.test_indices.tolist()})
        save_method_scores(out, scores, header | ({"target": "self"} if self_influence else {}), {
            "seconds": seconds, "peak_mb": mem.peak_mb, **indices, "extra": method.record, "key": method_key(cfg),
            "provenance": stamp("attribute", {"method": cfg.method, "attribution": cfg.attribution},
                                n_train=problem.n_train, final_model_run=run.path.name)})
        if wb is not None:
            wb.summary.update({"seconds": seconds, "peak_mb": mem.peak_mb})
        log.info("%s: %.2fs, peak %.0f MB -> %s", name, seconds, mem.peak_mb, out)
        return out
    finally:
        finish(wb)


def kept(cfg: DictConfig, started: float) -> Kept:
    """What an interrupted attribute stage leaves: the method's complete scores or none (or, for
    the alias `method=further_training`, what the gold-standard stage kept)."""
    if runs_gold_standard(cfg):
        return gold.kept(cfg, started)
    run, name = RunDir.from_config(cfg), node_name(cfg.method)
    if AttributionSettings.from_config(cfg.get("attribution")).target == "self":
        out, done, missing, what = (run.self_influence_dir(method_key(cfg)), "the self-influence is",
                                    "no self-influence was", "it")
    else:
        out, done, missing, what = run.method_dir(cfg), "the scores are", "no scores were", "them"
    if scores_complete(out):
        return Kept(f"attribution ({name})", f"{done} complete in {out}", "nothing is left to do")
    return Kept(f"attribution ({name})", f"{missing} written to {out}", f"re-run the same command to compute {what}")
