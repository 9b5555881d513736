"""Deterministic run directories and what lives in them.

One run directory per final model, derived from the resolved training config, so that
`attribute.py` and `evaluate.py` find it from the same overrides as `train.py`:

    runs/<dataset>-<model>-<optimizer>-<hash>/
        config.yaml            resolved training config
        final_model.safetensors
        metrics.json           final-model test loss / accuracy
        selection.json         left-out training indices, evaluated test indices, seeds
        features.safetensors   cached outputs of the frozen part (if any)
        gold/<key>/            further-training gold standard: one file per seed + meta.json
        methods/<key>/         one gradient method: scores.safetensors + record.json
        eval/<key>/            CSV, PNG, report.md of the evaluate stage
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from tda.config import config_hash, node_name, to_container

# The parts of the config that determine the final model and the selections.
RUN_KEYS = ("dataset", "model", "optimizer", "train", "selection", "seed")


def runs_root(cfg: DictConfig) -> Path:
    return Path(cfg.paths.runs_dir).expanduser().resolve()


def run_key(cfg: DictConfig) -> str:
    names = [node_name(cfg.dataset), node_name(cfg.model), node_name(cfg.optimizer)]
    nodes = [to_container(cfg[k]) for k in RUN_KEYS]
    # train.overwrite says whether to redo the run, not what the run is: it must find the same directory
    nodes[RUN_KEYS.index("train")] = {k: v for k, v in nodes[RUN_KEYS.index("train")].items() if k != "overwrite"}
    return "-".join(names + [config_hash(*nodes)])


def further_training_key(cfg: DictConfig) -> str:
    """Key of a gold standard: the further-training settings and its fresh optimizer. Settings
    that only choose how or which part a job computes (engine, group size, shards:
    tda.further_training.EXECUTION_KEYS) are left out, so shards fill one directory."""
    from tda.further_training import gold_settings

    return f"{node_name(cfg.further_optimizer)}-{config_hash(gold_settings(cfg.further_training), cfg.further_optimizer)}"


def method_key(cfg: DictConfig) -> str:
    return f"{node_name(cfg.method)}-{config_hash(cfg.method)}"


@dataclass(frozen=True)
class RunDir:
    path: Path

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "RunDir":
        return cls(runs_root(cfg) / run_key(cfg))

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def final_model(self) -> Path:
        return self.path / "final_model.safetensors"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.json"

    @property
    def selection(self) -> Path:
        return self.path / "selection.json"

    @property
    def features(self) -> Path:
        return self.path / "features.safetensors"

    def gold_dir(self, cfg: DictConfig) -> Path:
        return self.path / "gold" / further_training_key(cfg)

    def method_dir(self, cfg: DictConfig) -> Path:
        return self.path / "methods" / method_key(cfg)

    def eval_dir(self, key: str) -> Path:
        return self.path / "eval" / key

    def require_final_model(self) -> None:
        if not self.final_model.is_file() or not self.selection.is_file():
            raise FileNotFoundError(
                f"no final model in {self.path}. Train it first with the same dataset/model/optimizer/"
                f"train/selection overrides: `python train.py <your overrides>` "
                f"(or point paths.runs_dir / TDA_RUNS_DIR at the folder that holds it).")
