"""The stages: train, further_train (the gold standard), attribute, evaluate. Entry points
(`train.py`, `attribute.py`, `evaluate.py`) only parse the config and call these."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from tda.artifacts import (
    IntegrityError,
    load_tensors_with_metadata,
    remove_stale_temp_files,
    require_finite,
    save_json,
    save_tensors,
    save_text,
    tensor_checksum,
)
from tda.config import ConfigError, build, import_target, node_name, to_container
from tda.data.base import DataBundle
from tda.data.errors import data_problems, loading_errors
from tda.further_training.gold_standard import FurtherTraining
from tda.further_training.settings import FurtherTrainingSettings
from tda.further_training.store import (
    expected_gold,
    further_training_key,
    gold_status,
    is_sharded,
    job_files,
    load_gold_standard,
    seeds_of,
)
from tda.interrupt import file_states
from tda.memory import PeakMemory
from tda.methods.base import Method
from tda.models.base import TDAModel, compute_features
from tda.preflight import check_config
from tda.problem import AttributionProblem
from tda.provenance import (
    FinalModel,
    ProvenanceError,
    identity,
    read_final_model,
    read_initial_model,
    require_match,
    selection_fingerprint,
    stamp,
    supersede_dependents,
)
from tda.runs import RUN_KEYS, RunDir, method_key, run_key
from tda.scores import load_method_scores, save_method_scores
from tda.selection import (
    SelectionSettings,
    choose_indices,
    first_indices,
    left_out_indices,
    validate_indices,
    validate_selection,
)
from tda.tracking import finish, init_wandb, log_gold_progress, mark_cached
from tda.training import (
    BestCheckpoint,
    FinalModelModule,
    TrainerSettings,
    TrainSettings,
    evaluate_model,
    final_trainer,
    loaders,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------- shared
def load_data(cfg: DictConfig) -> DataBundle:
    """The dataset, refused (ConfigError) when the devices asked for are missing, it is empty or
    too small for the selection, holds NaN/inf or bad labels, or does not fit the model."""
    TrainerSettings.from_config(cfg.trainer).require_devices()  # before the (possibly long) load
    name = str(cfg.dataset.get("name", "the dataset"))
    with loading_errors(name):
        data = build(cfg.dataset, key="dataset")
    n_train, n_test = len(data.train), len(data.test)
    problems = data_problems(data, name) + _model_input_problems(cfg, data, name)
    problems += SelectionSettings.from_config(cfg.selection).fit_problems(n_train, n_test, name)
    problems += FurtherTrainingSettings.from_config(cfg.further_training).fit_problems(
        cfg.selection.n_left_out or n_train, n_train)
    if problems:
        raise ConfigError.listing("the configuration does not fit the data", problems)
    return data


def _model_input_problems(cfg: DictConfig, data: DataBundle, dataset: str) -> list[str]:
    """The model's declared inputs (TDAModel.modalities / input_dims) against the data's."""
    cls = import_target(cfg.model._target_)
    if not (isinstance(cls, type) and issubclass(cls, TDAModel)):
        return []
    shape = list(data.input_shape) if len(data.train) else None
    problem = cls.input_problem(cfg.model.get("name", cfg.model._target_), dataset, data.modality, shape)
    return [problem] if problem else []


def build_model(cfg: DictConfig, data: DataBundle) -> TDAModel:
    model = build(cfg.model, key="model", input_shape=list(data.input_shape), n_outputs=data.n_outputs)
    model.freeze_non_trainable()
    return model


def select(cfg: DictConfig, data: DataBundle) -> dict:
    """The left-out training instances and evaluated test instances, seeded and recorded."""
    sel = cfg.selection
    left_out, file_record = left_out_indices(SelectionSettings.from_config(sel), data)
    if sel.test == "first":
        test = first_indices(len(data.test), sel.n_test, what="evaluated test instances (selection.n_test)")
    else:
        test = choose_indices(len(data.test), sel.n_test, int(sel.seed) + 1,
                              what="evaluated test instances (selection.n_test)")
    validate_indices(left_out, len(data.train), "left-out training indices", "the selection (selection.*)")
    validate_indices(test, len(data.test), "evaluated test indices", "the selection (selection.*)")
    record = {"left_out_indices": left_out, "test_indices": test, "selection_seed": int(sel.seed),
              "rule": to_container(sel), "n_train": len(data.train), "n_test_total": len(data.test)}
    return record | ({"left_out_file": file_record} if file_record else {})


# ---------------------------------------------------------------------------------- train
def train(cfg: DictConfig) -> RunDir:
    check_config(cfg, "train")
    settings, trainer_settings = TrainSettings.from_config(cfg.train), TrainerSettings.from_config(cfg.trainer)
    run = RunDir.from_config(cfg)
    remove_stale_temp_files(run.path)
    if run.final_model.is_file() and not settings.overwrite and not trainer_settings.dry_run:
        read_final_model(run, cfg)  # a damaged or foreign model is reported now, not by the next stage
        log.info("final model already trained in %s (train.overwrite=true retrains)", run.path)
        finish(mark_cached(init_wandb(cfg, "train", run.path.name)))  # a W&B run with no timings
        return run
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    data = load_data(cfg)
    selection = select(cfg, data)
    model = build_model(cfg, data)
    # the retraining gold standard's start (a copy consumes no random numbers: the final model is unchanged)
    initial_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    x_tr, y_tr = data.tensors("train")
    x_te, y_te = data.tensors("test")
    frozen, trainable = model.split()
    features = None
    if frozen is not None:
        # The frozen part never changes, so its features are computed once (eval mode) and only
        # the trainable part trains on them; attribution reuses the same cache (run.features).
        if data.final_training_transform is not None:
            raise ValueError(f"dataset {data.name} augments inputs in final training, which cannot be combined with "
                             f"model.trainable={cfg.model.trainable} (the frozen part's features are cached); "
                             f"turn the augmentation off in the dataset config or use model.trainable=all")
        x_tr, x_te = compute_features(frozen, x_tr), compute_features(frozen, x_te)
        features = {"train": x_tr, "test": x_te[torch.tensor(selection["test_indices"])]}
    train_loader, test_loader = loaders(x_tr, y_tr, x_te, y_te, int(cfg.train.batch_size), int(cfg.seed))
    module = FinalModelModule(trainable, build(cfg.optimizer), data.task, transform=data.final_training_transform)
    wb = init_wandb(cfg, "train", run.path.name)
    logger = False
    if wb is not None:
        from lightning.pytorch.loggers import WandbLogger
        logger = WandbLogger(experiment=wb)
    if settings.final_checkpoint == "best_accuracy" and data.task != "classification":
        raise ConfigError(f"train.final_checkpoint=best_accuracy needs classes, but {data.name} is a {data.task} "
                          f"dataset; use train.final_checkpoint=best_loss or last")
    best = BestCheckpoint(settings.final_checkpoint) if settings.final_checkpoint != "last" else None
    trainer = final_trainer(settings, trainer_settings, logger, str(run.path), callbacks=[best] if best else None)
    t0 = time.perf_counter()
    trainer.fit(module, train_loader, test_loader)
    if trainer.interrupted:  # Lightning returned from a stopped fit: never write a partial model
        raise RuntimeError("final training was interrupted before its last epoch; no final model was written. "
                           "Re-run the same command to train it.")
    if trainer_settings.dry_run:
        log.info("trainer.fast_dev_run: a dry run of final training; nothing was written")
        finish(wb)
        return run
    seconds = time.perf_counter() - t0
    chosen = best.restore(trainable) if best is not None else {"rule": "last", "epoch": settings.epochs}
    model = model.float().cpu()
    metrics = {"test": evaluate_model(trainable, x_te, y_te, data.task),
               "train": evaluate_model(trainable, x_tr, y_tr, data.task),
               "seconds": seconds, "n_train": len(x_tr), "n_test": len(x_te),
               "n_trainable_params": sum(p.numel() for p in model.trainable_part().parameters()),
               "final_checkpoint": chosen}
    log.info("final model: test %s, train %s", metrics["test"], metrics["train"])
    state = dict(model.state_dict())
    require_finite(state, "the final model")  # before anything of the old run is moved aside
    data_fp = data.fingerprint()
    final = identity(tensor_checksum(state), data_fp,
                     selection_fingerprint(selection["left_out_indices"], selection["test_indices"]), run_key(cfg))
    run.path.mkdir(parents=True, exist_ok=True)
    supersede_dependents(run, final)
    save_text(run.config, OmegaConf.to_yaml(cfg, resolve=True))
    provenance = stamp("train", {k: cfg[k] for k in RUN_KEYS}, n_train=len(data.train), n_test=len(data.test))
    save_json(run.selection, selection | {"data_fingerprint": data_fp, "data_info": data.info,
                                          "provenance": provenance})
    save_json(run.metrics, metrics)
    if features is not None:
        save_tensors(run.features, features, metadata={"final_model": final}, what="the frozen part's features")
    # only what training changed: the frozen part (a pretrained encoder) is the final model's
    changed = {k: v for k, v in initial_state.items() if not torch.equal(v, state[k].to(v.dtype))}
    save_tensors(run.initial_model, changed, metadata={"identity": final}, what="the initial weights")
    # the model file is written last: its presence marks the run as complete
    save_tensors(run.final_model, state, metadata={"identity": final, "config_hash": provenance["config_hash"],
                                                   "code_version": provenance["code_version"]}, what="the final model")
    if wb is not None:
        wb.summary.update({f"final/{split}_{k}": v for split in ("test", "train") for k, v in metrics[split].items()})
    finish(wb)
    return run


# ---------------------------------------------------------------------------------- attribute
def attribution_problem(cfg: DictConfig, run: RunDir, data: DataBundle | None = None,
                         final: FinalModel | None = None,
                         start_weights: dict[str, torch.Tensor] | None = None) -> AttributionProblem:
    """Load the final model (verified) and its selections, apply (and cache) the frozen part.
    `start_weights`: entries of the state dict that replace the final model's (the retraining
    gold standard's initial weights; the frozen part is the final model's either way)."""
    final = final if final is not None else read_final_model(run, cfg)
    TrainerSettings.from_config(cfg.trainer).require_devices(attribution=True)
    data = data if data is not None else load_data(cfg)
    selection = final.selection
    validate_selection(selection, len(data.train), len(data.test), run.selection)
    fingerprint = data.fingerprint()
    if final.identity["data"] != fingerprint:
        raise ProvenanceError(f"the dataset loaded now differs from the one the final model in {run.path} was "
                              f"trained on (fingerprint {fingerprint} != {final.identity['data']}); check "
                              f"dataset.root / TDA_DATA_DIR, or retrain with train.overwrite=true")
    model = build_model(cfg, data)
    model.load_state_dict(final.state_dict | (start_weights or {}))
    model.eval()
    frozen, trainable = model.split()
    x_tr, y_tr = data.tensors("train")
    x_te, y_te = data.tensors("test")
    test_idx = torch.tensor(selection["test_indices"])
    x_te, y_te = x_te[test_idx], y_te[test_idx]
    if frozen is not None:
        feats = _cached_features(run, final.identity)
        if feats is not None:
            x_tr, x_te = feats["train"], feats["test"]
        else:
            x_tr, x_te = compute_features(frozen, x_tr), compute_features(frozen, x_te)
            save_tensors(run.features, {"train": x_tr, "test": x_te}, metadata={"final_model": final.identity},
                         what="the frozen part's features")
    return AttributionProblem(model=trainable, task=data.task, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
                              left_out_indices=torch.tensor(selection["left_out_indices"]), test_indices=test_idx,
                              device=torch.device(cfg.trainer.attribution_device), cache_dir=run.path / "cache",
                              memory_budget_mb=float(cfg.attribution.memory_budget_mb), final_model=final.identity)


def _cached_features(run: RunDir, final_model: dict) -> dict[str, torch.Tensor] | None:
    """The frozen part's cached features if they verify and were computed by this final model;
    a damaged or foreign cache is recomputed (it is a pure function of the model and data)."""
    if not run.features.is_file():
        return None
    try:
        feats, meta, _ = load_tensors_with_metadata(run.features)
        require_match(meta, {"final_model": final_model}, f"the cached features {run.features}", "recomputing them")
    except (IntegrityError, ProvenanceError) as err:
        log.warning("%s", err)
        return None
    return feats


def attribute(cfg: DictConfig) -> Path:
    """One method's scores [n_test, n_left_out] for the final model, into `methods/<key>/`; returns
    that directory. `method=further_training` is no method: its config declares `stage:
    further_train`, and the gold-standard stage runs instead (:func:`further_train`), so that
    `attribute.py method=further_training` and sweeps such as `-m method=further_training,grad_dot`
    keep working."""
    if cfg.method.get("stage") == "further_train":
        return further_train(cfg, stage="attribute")
    check_config(cfg, "attribute")
    run = RunDir.from_config(cfg)
    remove_stale_temp_files(run.path)
    final = read_final_model(run, cfg)  # fail before building anything else
    method = build(cfg.method)
    problem = attribution_problem(cfg, run, final=final)
    name = node_name(cfg.method)
    wb = init_wandb(cfg, "attribute", f"{run.path.name}/{name}")
    try:
        if not isinstance(method, Method):
            raise TypeError(f"method={name}: {type(method).__name__} is not a tda.methods.base.Method")
        out = run.method_dir(cfg)
        expected = (len(problem.test_indices), len(problem.left_out_indices))
        if (out / "scores.safetensors").is_file():
            load_method_scores(out, final.identity, expected)  # verified, and computed for this final model
            log.info("scores of %s already in %s", name, out)
            mark_cached(wb)
            return out
        torch.manual_seed(int(cfg.seed))
        problem.model.to(problem.device)  # methods run where the model is; data moves chunk by chunk
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            scores = method.scores(problem).cpu()
            seconds = time.perf_counter() - t0
        if tuple(scores.shape) != expected:
            raise ValueError(f"method {name} returned scores of shape {tuple(scores.shape)}, expected "
                             f"[n_test, n_left_out] = {expected}")
        header = {"method": name, "config": to_container(cfg.method), "final_model": final.identity,
                  "shape": list(expected)}
        save_method_scores(out, scores, header, {
            "seconds": seconds, "peak_mb": mem.peak_mb, "left_out_indices": problem.left_out_indices.tolist(),
            "test_indices": problem.test_indices.tolist(), "extra": method.record, "key": method_key(cfg),
            "provenance": stamp("attribute", {"method": cfg.method}, n_train=problem.n_train,
                                final_model_run=run.path.name)})
        if wb is not None:
            wb.summary.update({"seconds": seconds, "peak_mb": mem.peak_mb})
        log.info("%s: %.2fs, peak %.0f MB -> %s", name, seconds, mem.peak_mb, out)
        return out
    finally:
        finish(wb)


# ---------------------------------------------------------------------------------- further training
def further_train(cfg: DictConfig, stage: str = "further_train") -> Path:
    """The gold standard of the final model (tda.further_training): the seeds of this job
    (`further_training`, its shard) trained further with a fresh `further_optimizer`, written
    seed by seed into `gold/<key>/`, which is returned. Finished seeds are kept, so a re-run
    resumes. `stage` names the entry point in messages and as the W&B job type: `further_train`,
    or `attribute` for the alias `attribute.py method=further_training`."""
    check_config(cfg, stage)
    run = RunDir.from_config(cfg)
    remove_stale_temp_files(run.path)
    final = read_final_model(run, cfg)  # fail before building anything else
    data = load_data(cfg)
    start = _initial_weights(cfg, run, final, data) if cfg.further_training.start == "initial_weights" else None
    problem = attribution_problem(cfg, run, data=data, final=final, start_weights=start)
    ft, further_optimizer = cfg.further_training, cfg.further_optimizer
    out = run.gold_dir(further_training_key(cfg))
    wb = init_wandb(cfg, stage, f"{run.path.name}/further_training")
    try:
        files = job_files(ft, out)
        before = file_states(files)  # unchanged afterwards: every seed was already there (cached)
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            seeds = FurtherTraining(ft, further_optimizer, trainer=cfg.trainer).run(problem, out)
            seconds = time.perf_counter() - t0
        # the merge step: every seed and part present once, all finite (a shard only reports)
        expected = expected_gold(final.identity, final.selection, ft, further_optimizer)
        log.info(gold_status(out, expected, seeds_of(ft), complete=not is_sharded(ft)))
        if wb is not None:
            computed = sum(state != before[p] for p, state in file_states(files).items())
            wb.summary.update({"seeds_done": len(seeds), "seeds_computed": computed})
            if computed:
                wb.summary.update({"seconds": seconds, "peak_mb": mem.peak_mb})
            else:
                mark_cached(wb)
            _log_gold_progress(wb, out, expected, seeds_of(ft))
        return out
    finally:
        finish(wb)


def _initial_weights(cfg: DictConfig, run: RunDir, final: FinalModel, data: DataBundle) -> dict[str, torch.Tensor]:
    """`further_training.start=initial_weights` (the retraining gold standard): the final model's
    initial weights (verified), once the runs are known to repeat its final training."""
    problems = FurtherTrainingSettings.from_config(cfg.further_training).retraining_problems(
        to_container(cfg.train), to_container(cfg.optimizer), to_container(cfg.further_optimizer),
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


# ---------------------------------------------------------------------------------- evaluate
def evaluate(cfg: DictConfig, overrides: list[str] | None = None) -> Path:
    """Evaluate the methods of this final model, or with `evaluate.compare` several experiments,
    each composed from `overrides` (default: the running Hydra app's) plus its own."""
    from tda.evaluation.compare import evaluate_compare
    from tda.evaluation.evaluate import evaluate_run

    check_config(cfg, "evaluate")
    if cfg.evaluate.get("compare"):
        return evaluate_compare(cfg, overrides)  # several experiments, each composed from its own overrides
    run = RunDir.from_config(cfg)
    return evaluate_run(cfg, run, read_final_model(run, cfg))
