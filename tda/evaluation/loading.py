"""Loading what one evaluation compares: the gold standard of the current further-training
settings and every method's scores for one final model, and the dataset (for labels, targets
and the examples), each verified and checked to belong to that final model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from tda.config import build
from tda.data.base import DataBundle
from tda.data.label_noise import recorded_settings, with_label_noise
from tda.further_training.attribution import GoldStandard
from tda.further_training.store import GoldStandardSpec, load_gold_standard, require_variation
from tda.provenance import FinalModel, ProvenanceError, read_final_model
from tda.runs import RunDir
from tda.scores import load_method_scores, scores_complete


def load_experiment(spec: GoldStandardSpec, run: RunDir, final: FinalModel | None = None
                    ) -> tuple[GoldStandard, dict[str, torch.Tensor], dict[str, dict]]:
    """The gold standard `spec` and every method's scores [n_test, n_left_out] (float64) and
    record for the final model of `run`, each verified and checked to be computed from that
    final model (and, for the gold standard, with the settings, seeds and selection of `spec`)."""
    final = final if final is not None else read_final_model(run)
    gold = load_gold_standard(run.gold_dir(spec.key), spec.expected(final.identity, final.selection),
                              spec.settings.seeds)
    require_variation(gold, run.gold_dir(spec.key))  # as the stage that wrote it: it ranks nothing
    scores, records = load_all_method_scores(run, final.identity, gold)
    return gold, scores, records


def load_data(cfg: DictConfig, run: RunDir, final: FinalModel) -> DataBundle:
    """The dataset of `cfg` with the training labels the final model's selection.json records as
    flipped (tda.data.label_noise), checked by content to be the one the final model of `run` was
    trained on: its labels and targets are compared with the scores (class structure) and
    shown beside them (examples)."""
    data = with_label_noise(build(cfg.dataset, key="dataset"), recorded_settings(final.selection.get("label_noise")))
    fingerprint = data.fingerprint()
    if fingerprint != final.identity["data"]:
        raise ProvenanceError(f"the dataset loaded now differs from the one the final model in {run.path} was trained "
                              f"on (fingerprint {fingerprint} != {final.identity['data']}); check dataset.root / "
                              f"TDA_DATA_DIR and the dataset overrides, or retrain with train.overwrite=true")
    return data


def load_all_method_scores(run: RunDir, final_model: dict, gold: GoldStandard
                           ) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Scores [n_test, n_left_out] of every method computed for this final model. A method
    whose scores belong to another final model, or are damaged, is refused with its fix.
    Labels are the method name, or, when one method was run with several configs (e.g. a
    damping sweep), the name plus the config values that differ: `cg(damping=0.1)`."""
    shape = (len(gold.meta["test_indices"]), len(gold.meta["left_out_indices"]))
    return _load_all(run.method_dirs(), final_model, shape)


def load_all_self_influence(run: RunDir, final_model: dict, n_train: int
                            ) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Self-influence [n_train] and record of every method computed for this final model with
    `attribution.target=self`, and of the gold standard's self-effect (`self_influence/<key>/`),
    verified and labelled as :func:`load_all_method_scores` does for scores."""
    return _load_all(run.self_influence_dirs(), final_model, (n_train,))


def _load_all(dirs: list[Path], final_model: dict, shape: tuple[int, ...]
              ) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """The completed scores of `shape` (float64) and records in `dirs`, verified, by label."""
    loaded: list[tuple[Path, torch.Tensor, dict]] = []
    for d in dirs:
        if not scores_complete(d):
            continue  # unfinished method: never read a partial result
        loaded.append((d, *load_method_scores(d, final_model, shape)))
    labels = _method_labels([r for _, _, r in loaded], [d.name for d, _, _ in loaded])
    scores = {label: s.double() for (_, s, _), label in zip(loaded, labels)}
    records = {label: r for (_, _, r), label in zip(loaded, labels)}
    return scores, records


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as {dotted.key: value}."""
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _method_labels(records: list[dict], dir_names: list[str]) -> list[str]:
    """The method's name, or with several configs of one method the values that differ."""
    labels = []
    for rec, dname in zip(records, dir_names):
        same = [r for r in records if r["method"] == rec["method"]]
        if len(same) == 1:
            labels.append(rec["method"])
            continue
        flats = [_flat(r.get("config", {})) for r in same]
        keys = sorted({k for f in flats for k in f if len({repr(g.get(k)) for g in flats}) > 1})
        mine = _flat(rec.get("config", {}))
        labels.append(f"{rec['method']}({','.join(f'{k}={mine.get(k)}' for k in keys)})" if keys else dname)
    return labels
