"""The train stage: the final model θᶠ and the seeded selection of left-out and test instances,
written into the run directory (tda.runs.RunDir)."""

from __future__ import annotations

import logging
import time

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from tda.artifacts import (
    load_tensor_metadata,
    remove_stale_temp_files,
    require_finite,
    save_json,
    save_tensors,
    save_text,
    tensor_checksum,
)
from tda.config import ConfigError, build
from tda.exits import WRITABLE_RUNS_FIX, require_writable_directory
from tda.interrupt import Kept
from tda.models.base import compute_features
from tda.preflight import check_config
from tda.provenance import (
    identity,
    read_final_model,
    reproduction_note,
    selection_fingerprint,
    stamp,
    supersede_dependents,
)
from tda.runs import RUN_KEYS, RunDir, RunSettings
from tda.stages.inputs import build_model, load_data, select
from tda.tracking import finish, init_wandb, mark_cached
from tda.training import BestCheckpoint, FinalModelModule, evaluate_model, final_trainer, loaders

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> RunDir:
    """Train the final model of `cfg` into its run directory, which is returned; a run directory
    that holds one already is kept (`train.overwrite=true` retrains)."""
    settings = check_config(cfg, "train")
    run = RunDir.from_config(cfg, settings)
    remove_stale_temp_files(run.path)
    if run.final_model.is_file() and not settings.train.overwrite and not settings.trainer.dry_run:
        read_final_model(run)  # a damaged or foreign model is reported now, not by the next stage
        log.info("final model already trained in %s (train.overwrite=true retrains)", run.path)
        finish(mark_cached(init_wandb(cfg, "train", run.path.name)))  # a W&B run with no timings
        return run
    if not settings.trainer.dry_run:
        require_writable_directory(run.path, "train writes the final model", WRITABLE_RUNS_FIX)
    # the model a retraining replaces: said below if the new one differs from it (thread count)
    previous = _header_or_none(run)
    L.seed_everything(settings.seed, workers=True, verbose=False)
    data = load_data(cfg, settings)
    selection = select(settings.selection, data)
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
    train_loader, test_loader = loaders(x_tr, y_tr, x_te, y_te, settings.train.batch_size, settings.seed)
    module = FinalModelModule(trainable, build(cfg.optimizer), data.task, transform=data.final_training_transform)
    wb = init_wandb(cfg, "train", run.path.name)
    logger = WandbLogger(experiment=wb) if wb is not None else False
    rule = settings.train.final_checkpoint
    if rule == "best_accuracy" and data.task != "classification":
        raise ConfigError(f"train.final_checkpoint=best_accuracy needs classes, but {data.name} is a {data.task} "
                          f"dataset; use train.final_checkpoint=best_loss or last")
    best = BestCheckpoint(rule) if rule != "last" else None
    trainer = final_trainer(settings.train, settings.trainer, logger, str(run.path),
                            callbacks=[best] if best else None)
    t0 = time.perf_counter()
    trainer.fit(module, train_loader, test_loader)
    if trainer.interrupted:  # Lightning returned from a stopped fit: never write a partial model
        raise RuntimeError("final training was interrupted before its last epoch; no final model was written. "
                           "Re-run the same command to train it.")
    if settings.trainer.dry_run:
        log.info("trainer.fast_dev_run: a dry run of final training; nothing was written")
        finish(wb)
        return run
    seconds = time.perf_counter() - t0
    chosen = best.restore(trainable) if best is not None else {"rule": "last", "epoch": settings.train.epochs}
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
                     selection_fingerprint(selection["left_out_indices"], selection["test_indices"],
                                           selection.get("label_noise")), run.key)
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
                                                   "code_version": provenance["code_version"],
                                                   "environment": provenance["environment"]}, what="the final model")
    note = reproduction_note(previous, final["weights"]) if previous is not None else None
    if note:
        log.warning(note)
    if wb is not None:
        wb.summary.update({f"final/{split}_{k}": v for split in ("test", "train") for k, v in metrics[split].items()})
    finish(wb)
    return run


def _header_or_none(run: RunDir) -> dict | None:
    """The header of the final model in `run` (display only), or None: none, or unreadable."""
    try:
        return load_tensor_metadata(run.final_model) if run.final_model.is_file() else None
    except Exception:  # noqa: BLE001 - a damaged model is what train.overwrite=true replaces
        return None


def kept(cfg: DictConfig, started: float) -> Kept:
    """What an interrupted train stage leaves: a complete final model or none (training does not
    resume mid-way). `started`: when the stage began (time.time())."""
    settings = RunSettings.from_config(cfg)
    run = RunDir.from_config(cfg, settings)
    model = run.final_model
    if model.is_file() and (not settings.train.overwrite or model.stat().st_mtime >= started):
        return Kept("training", f"the final model is complete in {run.path}", "nothing is left to do")
    if model.is_file():  # train.overwrite=true stopped before the new model was written
        return Kept("training", f"the new final model was not written; the previous one in {run.path} is unchanged",
                    "re-run the same command to retrain")
    return Kept("training", "no final model was written (training does not resume mid-way)",
                "re-run the same command to train it")
