"""The further_train stage: the gold standard of a final model (tda.further_training), written
seed by seed into `gold/<key>/`: leave-one-out (further training or retraining) or, with
`further_training.runs=subsets`, the subset gold standard of the linear datamodeling score; with
`attribution.target=self`, its self-effect of every training instance, into
`self_influence/gold-<key>/`. Also reached as `attribute.py method=further_training`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig

from tda.artifacts import IntegrityError, remove_stale_temp_files
from tda.config import ConfigError, to_container
from tda.data.base import DataBundle
from tda.further_training.gold_standard import FurtherTraining
from tda.further_training.self_effect import SelfEffect, self_effect_key
from tda.further_training.store import GoldStandardSpec, gold_status, load_gold_standard
from tda.further_training.subset_gold import SubsetTraining, require_every_training_instance
from tda.further_training.subset_store import load_subset_gold_standard
from tda.further_training.subsets import initialisation_seed
from tda.interrupt import Kept
from tda.memory import PeakMemory
from tda.preflight import Settings, check_config
from tda.problem import AttributionProblem, AttributionSettings
from tda.provenance import FinalModel, ProvenanceError, read_final_model, read_initial_model
from tda.runs import RunDir
from tda.stages.inputs import attribution_problem, build_model, load_data
from tda.tracking import finish, init_wandb, log_gold_progress, mark_cached

log = logging.getLogger(__name__)


def further_train(cfg: DictConfig, stage: str = "further_train") -> Path:
    """The gold standard of the final model (tda.further_training): the seeds of this job
    (`further_training`, its shard) trained further with a fresh `further_optimizer`, written
    seed by seed into `gold/<key>/`, which is returned. Finished seeds are kept, so a re-run
    resumes. `stage` names the entry point in messages and as the W&B job type: `further_train`,
    or `attribute` for the alias `attribute.py method=further_training`."""
    settings = check_config(cfg, stage)
    run = RunDir.from_config(cfg, settings)
    remove_stale_temp_files(run.path)
    final = read_final_model(run)  # fail before building anything else
    ft = settings.further_training
    spec = GoldStandardSpec.from_config(cfg, ft)
    # each training instance's effect on its own loss: refused before any data is loaded if it has none
    self_effect = SelfEffect(spec, settings.trainer.accelerator) if settings.attribution.target == "self" else None
    data = load_data(cfg, settings)
    subsets = ft.runs == "subsets"
    if subsets:
        require_every_training_instance(final.selection["left_out_indices"], len(data.train), run.path.name)
    start = _initial_weights(cfg, settings, run, final, data) if ft.start == "initial_weights" else None
    problem = attribution_problem(cfg, settings, run, data=data, final=final, start_weights=start)
    if self_effect is not None:
        return _self_effect(cfg, run, spec, self_effect, problem, stage)
    out = run.gold_dir(spec.key)
    wb = init_wandb(cfg, stage, f"{run.path.name}/further_training")
    try:
        files = spec.job_files(out)
        before = _file_states(files)  # unchanged afterwards: every seed was already there (cached)
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            if subsets:
                fresh = _fresh_weights(cfg, data) if ft.subsets.initialisation == "per_seed" else None
                seeds = SubsetTraining(spec, accelerator=settings.trainer.accelerator).run(problem, out, fresh)
            else:
                seeds = FurtherTraining(spec, accelerator=settings.trainer.accelerator).run(problem, out)
            seconds = time.perf_counter() - t0
        # the merge step: every seed and part present once, all finite (a shard only reports)
        expected = spec.expected(final.identity, final.selection)
        log.info(gold_status(out, expected, ft.seeds, complete=not ft.is_sharded,
                             load=load_subset_gold_standard if subsets else load_gold_standard))
        if wb is not None:
            computed = sum(state != before[p] for p, state in _file_states(files).items())
            wb.summary.update({"seeds_done": len(seeds), "seeds_computed": computed})
            if computed:
                wb.summary.update({"seconds": seconds, "peak_mb": mem.peak_mb})
            else:
                mark_cached(wb)
            if not subsets:
                _log_gold_progress(wb, out, expected, ft.seeds)
        return out
    finally:
        finish(wb)


def _fresh_weights(cfg: DictConfig, data: DataBundle) -> Callable[[int], dict[str, torch.Tensor]]:
    """`further_training.subsets.initialisation=per_seed`: seed -> the trainable part's weights of
    the model built afresh (its own initialisation) under that seed's generator."""
    def weights(seed: int) -> dict[str, torch.Tensor]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(initialisation_seed(seed))
            model = build_model(cfg, data)
        return model.split()[1].state_dict()
    return weights


def _self_effect(cfg: DictConfig, run: RunDir, spec: GoldStandardSpec, job: SelfEffect,
                 problem: AttributionProblem, stage: str) -> Path:
    """`attribution.target=self`: the gold standard's self-effect of every training instance
    (tda.further_training.self_effect) into `self_influence/gold-<key>/`, which is returned."""
    out = run.self_influence_dir(self_effect_key(spec))
    wb = init_wandb(cfg, stage, f"{run.path.name}/further_training/self_effect")
    try:
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            job.run(problem, out)
            seconds = time.perf_counter() - t0
        if wb is not None:
            wb.summary.update({"seconds": seconds, "peak_mb": mem.peak_mb})
        return out
    finally:
        finish(wb)


def _initial_weights(cfg: DictConfig, settings: Settings, run: RunDir, final: FinalModel, data: DataBundle
                     ) -> dict[str, torch.Tensor]:
    """`further_training.start=initial_weights` (the retraining gold standard): the final model's
    initial weights (verified), once the runs are known to repeat its final training."""
    problems = settings.further_training.retraining_problems(
        settings.train, to_container(cfg.optimizer), to_container(cfg.further_optimizer),
        augmenting_dataset=data.name if data.final_training_transform is not None else None)
    if problems:
        raise ConfigError.listing("further_training.start=initial_weights (gold_standard=retraining) cannot repeat "
                                  "the final training", problems)
    return read_initial_model(run, final)


def _log_gold_progress(wb, gold_dir: Path, expected: dict, seeds: list[int]) -> None:
    """W&B: the size of the gold-standard attribution per checkpoint, over the seeds merged so
    far (a shard's job may find none of them complete yet: then only a warning)."""
    try:
        gold = load_gold_standard(gold_dir, expected, seeds, require_all=False)
    except (FileNotFoundError, ValueError) as err:
        if isinstance(err, (ProvenanceError, IntegrityError)):
            raise  # foreign or damaged files are never glossed over
        log.warning("not logging further-training progress to W&B: %s", err)
        return
    log_gold_progress(wb, gold)


def kept(cfg: DictConfig, started: float) -> Kept:
    """What an interrupted further_train stage leaves: every seed (or part) of this job that was
    complete; the one in progress is not written."""
    spec, run = GoldStandardSpec.from_config(cfg), RunDir.from_config(cfg)
    if AttributionSettings.from_config(cfg.get("attribution")).target == "self":
        what, gold = "further training (self-effect)", run.self_influence_dir(self_effect_key(spec))
    else:
        what, gold = "further training", run.gold_dir(spec.key)
    files = spec.job_files(gold)
    n = sum(p.is_file() for p in files)
    block = "block of subsets" if spec.settings.runs == "subsets" else "left-out shard"
    unit = f"seeds of this {block}" if spec.settings.column_shard.count > 1 else "seeds"
    return Kept(what, f"{n} of {len(files)} {unit} are complete in {gold} (the seed in progress was not written)",
                "re-run the same command to resume")


def _file_states(paths: list[Path]) -> dict[Path, tuple[int, int] | None]:
    """(inode, mtime) of each file, None when absent: equal before and after a job when the job
    wrote none of them (a cached job)."""
    out: dict[Path, tuple[int, int] | None] = {}
    for p in paths:
        try:
            st = p.stat()
            out[p] = (st.st_ino, st.st_mtime_ns)
        except FileNotFoundError:
            out[p] = None
    return out
