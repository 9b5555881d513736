"""What the stages share: the dataset (checked against the config), the model, the seeded
selection of left-out and test instances, and the attribution problem of a final model."""

from __future__ import annotations

import dataclasses
import logging

import torch
from omegaconf import DictConfig

from tda.artifacts import IntegrityError, load_tensors_with_metadata, save_tensors
from tda.config import ConfigError, build, import_target, node_name
from tda.data.base import DataBundle
from tda.data.errors import data_problems, loading_errors
from tda.data.label_noise import with_label_noise
from tda.models.base import TDAModel, compute_features
from tda.preflight import Settings
from tda.problem import AttributionProblem
from tda.provenance import FinalModel, ProvenanceError, read_final_model, require_match
from tda.runs import RunDir
from tda.selection import (
    SelectionSettings,
    choose_indices,
    first_indices,
    left_out_indices,
    validate_indices,
    validate_selection,
)

log = logging.getLogger(__name__)


def load_data(cfg: DictConfig, settings: Settings) -> DataBundle:
    """The dataset, its training labels flipped as `label_noise` says (tda.data.label_noise), refused
    (ConfigError) when the devices asked for are missing, it is empty or too small for the
    selection, holds NaN/inf or bad labels, or does not fit the model."""
    settings.trainer.require_devices()  # before the (possibly long) load
    name = node_name(cfg.dataset, key="dataset")
    with loading_errors(name):
        data = build(cfg.dataset, key="dataset")
    data = with_label_noise(data, settings.label_noise)
    n_train, n_test = len(data.train), len(data.test)
    problems = data_problems(data, name) + _model_input_problems(cfg, data, name)
    problems += settings.selection.fit_problems(n_train, n_test, name)
    problems += settings.further_training.fit_problems(settings.selection.left_out_count(n_train), n_train,
                                                       min(settings.selection.n_test or n_test, n_test))
    if problems:
        raise ConfigError.listing("the configuration does not fit the data", problems)
    return data


def _model_input_problems(cfg: DictConfig, data: DataBundle, dataset: str) -> list[str]:
    """The model's declared inputs (TDAModel.modalities / input_dims) against the data's."""
    cls = import_target(cfg.model._target_)
    if not (isinstance(cls, type) and issubclass(cls, TDAModel)):
        return []
    shape = list(data.input_shape) if len(data.train) else None
    problem = cls.input_problem(node_name(cfg.model, key="model"), dataset, data.modality, shape)
    return [problem] if problem else []


def build_model(cfg: DictConfig, data: DataBundle) -> TDAModel:
    model = build(cfg.model, key="model", input_shape=list(data.input_shape), n_outputs=data.n_outputs)
    model.freeze_non_trainable()
    return model


def select(settings: SelectionSettings, data: DataBundle) -> dict:
    """The left-out training instances and evaluated test instances, seeded and recorded, and the
    training labels the data's label noise flipped."""
    left_out, file_record = left_out_indices(settings, data)
    what = "evaluated test instances (selection.n_test)"
    if settings.test == "first":
        test = first_indices(len(data.test), settings.n_test, what=what)
    else:
        test = choose_indices(len(data.test), settings.n_test, settings.seed + 1, what=what)
    validate_indices(left_out, len(data.train), "left-out training indices", "the selection (selection.*)")
    validate_indices(test, len(data.test), "evaluated test indices", "the selection (selection.*)")
    record = {"left_out_indices": left_out, "test_indices": test, "selection_seed": settings.seed,
              "rule": dataclasses.asdict(settings), "n_train": len(data.train), "n_test_total": len(data.test)}
    if data.label_noise is not None:  # the flipped training labels, for every later stage
        record["label_noise"] = data.label_noise
    return record | ({"left_out_file": file_record} if file_record else {})


def attribution_problem(cfg: DictConfig, settings: Settings, run: RunDir, data: DataBundle | None = None,
                        final: FinalModel | None = None,
                        start_weights: dict[str, torch.Tensor] | None = None) -> AttributionProblem:
    """Load the final model (verified) and its selections, apply (and cache) the frozen part.
    `start_weights`: entries of the state dict that replace the final model's (the retraining
    gold standard's initial weights; the frozen part is the final model's either way)."""
    final = final if final is not None else read_final_model(run)
    settings.trainer.require_devices(attribution=True)
    data = data if data is not None else load_data(cfg, settings)
    selection = final.selection
    validate_selection(selection, len(data.train), len(data.test), run.selection)
    fingerprint = data.fingerprint()
    if final.identity["data"] != fingerprint:
        raise ProvenanceError(f"the dataset loaded now differs from the one the final model in {run.path} was "
                              f"trained on (fingerprint {fingerprint} != {final.identity['data']}); check "
                              f"dataset.root / TDA_DATA_DIR, or retrain with train.overwrite=true")
    if data.label_noise != selection.get("label_noise"):
        raise ProvenanceError(f"the training labels flipped now (label_noise) differ from those {run.selection} "
                              f"records for the final model in {run.path}; restore it, or retrain with "
                              f"train.overwrite=true")
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
                              device=torch.device(settings.trainer.attribution_device), cache_dir=run.cache,
                              memory_budget_mb=float(settings.attribution.memory_budget_mb),
                              final_model=final.identity)


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
