"""Deterministic run directories and what lives in them.

One run directory per final model, derived from the resolved training config, so that
`attribute.py` and `evaluate.py` find it from the same overrides as `train.py`:

    runs/<dataset>-<model>-<optimizer>-<hash>/
        config.yaml            resolved training config
        final_model.safetensors
        initial_model.safetensors
                               the weights final training started from (the retraining gold standard's start)
        metrics.json           final-model test loss / accuracy
        selection.json         left-out training indices, evaluated test indices, seeds
        features.safetensors   cached outputs of the frozen part (if any)
        gold/<key>/            gold standard (further training or retraining): one file per seed + meta.json
        methods/<key>/         one gradient method: scores.safetensors + record.json
        self_influence/<key>/  one method's self-influence of every training instance (attribution.target=self),
                               or the gold standard's self-effect (gold-<gold key>/)
        eval/<key>/            CSV, PNG, report.md of the evaluate stage
        cache/                 methods' caches keyed by model and data (damping λ₀, K-FAC factors)
        superseded/<weights>/  what was computed from a final model that train.overwrite replaced

    runs/compare/<name>-<hash>/  several experiments in one figure (evaluate.compare)

RunDir hands out every one of these paths; a stage says what it wrote into them (tda.stages).

Every name from the config that becomes a path component (the dataset / model / optimizer /
further_optimizer / method names and the experiment `name`) is checked by `check_names` before
any directory is derived (tda.config.SAFE_NAME), and every directory a RunDir hands out is
checked to lie inside paths.runs_dir, so no config value can make a stage write elsewhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from tda.artifacts import file_sha256
from tda.config import SAFE_NAME_RULE, config_hash, node_name, safe_name, to_container
from tda.data.label_noise import LabelNoiseSettings
from tda.selection import SelectionSettings
from tda.training import TrainerSettings, TrainSettings

# The parts of the config that determine the final model and the selections.
RUN_KEYS = ("dataset", "model", "optimizer", "train", "selection", "label_noise", "seed")


# The `_target_` nodes whose names become path components or W&B names.
NAMED_NODES = ("dataset", "model", "optimizer", "further_optimizer", "method")


def runs_root(cfg: DictConfig) -> Path:
    return Path(cfg.paths.runs_dir).expanduser().resolve()


def check_names(cfg: DictConfig) -> None:
    """Raise a ConfigError (naming the key, the value and the fix) for the first name that is
    not directory-name safe: each node's `name` (or its `_target_`-derived fallback) and the
    experiment `name` (null means unnamed; an empty string is refused)."""
    for key in NAMED_NODES:
        if cfg.get(key) is not None:
            node_name(cfg[key], key=key)
    if cfg.get("name") is not None:
        safe_name(cfg.name, "name")


def inside(root: Path, path: Path) -> Path:
    """`path`, after checking that it lies inside `root` once `.` and `..` are resolved
    (lexically: a run directory that the user symlinked to another disk stays usable)."""
    resolved, base = Path(os.path.abspath(path.expanduser())), Path(os.path.abspath(root.expanduser()))
    if resolved == base or not resolved.is_relative_to(base):
        raise ValueError(f"{path} resolves to {resolved}, not inside the runs directory {base}; refusing to write "
                         f"there. Give the dataset / model / optimizer / further_optimizer / method / experiment "
                         f"names as {SAFE_NAME_RULE}.")
    return path


# `trainer` settings that do not change what final training computes (where and how it runs,
# what it displays) stay out of the run key; any other Lightning argument passed through
# (`+trainer.accumulate_grad_batches=4`, `+trainer.limit_train_batches=...`) is part of it, so a
# model trained with it never answers for a run without it.
TRAINER_KEYS_OUTSIDE_RUN = frozenset({
    "accelerator", "devices", "strategy", "progress_bar", "attribution_device", "num_nodes", "fast_dev_run",
    "enable_progress_bar", "enable_model_summary", "log_every_n_steps", "default_root_dir", "profiler",
    "num_sanity_val_steps", "limit_val_batches", "check_val_every_n_epoch", "val_check_interval", "logger",
    "callbacks", "barebones", "sync_batchnorm", "plugins", "use_distributed_sampler",
    "reload_dataloaders_every_n_epochs",
})


@dataclass(frozen=True)
class RunSettings:
    """The typed sections a run directory's key is derived from (tda.preflight.Settings, a stage's
    checked sections, extends it)."""

    train: TrainSettings
    selection: SelectionSettings
    trainer: TrainerSettings
    seed: int
    label_noise: LabelNoiseSettings

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "RunSettings":
        return cls(TrainSettings.from_config(cfg.train), SelectionSettings.from_config(cfg.selection),
                   TrainerSettings.from_config(cfg.get("trainer")), int(cfg.seed),
                   LabelNoiseSettings.from_config(cfg.get("label_noise")))


def run_key(cfg: DictConfig, settings: RunSettings | None = None) -> str:
    """The run directory's name: the dataset / model / optimizer names and a hash of those nodes
    and of the keyed `train` and `selection` settings (Section.keyed), the seed, the label noise
    (when labels are flipped) and the Lightning arguments passed through that change what final
    training computes. `settings`:
    the config's sections, when the caller has built (and checked) them already."""
    settings = settings if settings is not None else RunSettings.from_config(cfg)
    names = [node_name(cfg.dataset), node_name(cfg.model), node_name(cfg.optimizer)]
    selection = settings.selection.keyed()
    if "left_out_file" in selection:  # the file's content, not its path, defines the run
        path = Path(selection["left_out_file"]).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"selection.left_out_file={path} does not exist; point it at the file of left-out "
                                    f"training-row indices (the run was trained with its content)")
        selection["left_out_file"] = {"sha256": file_sha256(path)}
    nodes = [to_container(cfg.dataset), to_container(cfg.model), to_container(cfg.optimizer), settings.train.keyed(),
             selection, settings.seed]
    noise = settings.label_noise.keyed()
    if noise:  # absent without noise, so the keys of runs on clean labels are unchanged
        nodes.append({"label_noise": noise})
    passed = {k: v for k, v in settings.trainer.lightning.items() if k not in TRAINER_KEYS_OUTSIDE_RUN}
    if passed:  # absent for every run without such arguments, so their keys are unchanged
        nodes.append({"trainer": passed})
    return "-".join(names + [config_hash(*nodes)])


def method_key(cfg: DictConfig) -> str:
    return f"{node_name(cfg.method)}-{config_hash(cfg.method)}"


@dataclass(frozen=True)
class RunDir:
    """One run directory, the one owner of its layout: every path in it comes from here (the
    files inside `gold/<key>/` and `methods/<key>/` are named by the modules that write and read
    them: tda.further_training.store, tda.scores). `from_config` checks the config's names and
    that the directory lies inside paths.runs_dir; every directory it hands out is checked to lie
    inside it."""
    path: Path

    @classmethod
    def from_config(cls, cfg: DictConfig, settings: RunSettings | None = None) -> "RunDir":
        """The run directory of a composed config; `settings`: its sections (e.g. the stage's
        tda.preflight.Settings), when the caller has built them already."""
        check_names(cfg)
        root = runs_root(cfg)
        return cls(inside(root, root / run_key(cfg, settings)))

    def _inside(self, path: Path) -> Path:
        return inside(self.path, path)

    @property
    def key(self) -> str:
        """The run key (tda.runs.run_key) the directory is named by; the final model records it."""
        return self.path.name

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def final_model(self) -> Path:
        return self.path / "final_model.safetensors"

    @property
    def initial_model(self) -> Path:
        """The weights final training started from (the retraining gold standard's start)."""
        return self.path / "initial_model.safetensors"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.json"

    @property
    def selection(self) -> Path:
        return self.path / "selection.json"

    @property
    def features(self) -> Path:
        return self.path / "features.safetensors"

    @property
    def cache(self) -> Path:
        """Methods' caches keyed by model and data (damping λ₀, K-FAC factors): AttributionProblem.cache_dir."""
        return self.path / "cache"

    @property
    def superseded(self) -> Path:
        """Where what was computed from a replaced final model goes (tda.provenance.supersede_dependents)."""
        return self.path / "superseded"

    @property
    def _gold(self) -> Path:
        return self.path / "gold"

    @property
    def _methods(self) -> Path:
        return self.path / "methods"

    @property
    def _eval(self) -> Path:
        return self.path / "eval"

    @property
    def _self_influence(self) -> Path:
        return self.path / "self_influence"

    @property
    def dependents(self) -> list[Path]:
        """Everything in the directory computed from its final model."""
        return [self._gold, self._methods, self._self_influence, self._eval, self.cache, self.features]

    def gold_dir(self, key: str) -> Path:
        """`gold/<key>/`; key: tda.further_training.store.GoldStandardSpec.key of the config."""
        return self._inside(self._gold / safe_name(key, "the gold-standard key"))

    def gold_dirs(self) -> list[Path]:
        """Every gold standard's directory present, in order of key."""
        return _subdirectories(self._gold)

    def method_dir(self, cfg: DictConfig) -> Path:
        """`methods/<key>/` of the config's method (:func:`method_key`)."""
        return self._inside(self._methods / method_key(cfg))

    def method_dirs(self) -> list[Path]:
        """Every method's directory present, in order of key."""
        return _subdirectories(self._methods)

    def self_influence_dir(self, key: str) -> Path:
        """`self_influence/<key>/`: a method's self-influence (key: :func:`method_key`) or the gold
        standard's self-effect (key: `gold-<its key>`)."""
        return self._inside(self._self_influence / safe_name(key, "the self-influence key"))

    def self_influence_dirs(self) -> list[Path]:
        """Every self-influence directory present, in order of key."""
        return _subdirectories(self._self_influence)

    @property
    def eval_root(self) -> Path:
        """`eval/`: where every evaluation of this final model is written."""
        return self._eval

    def eval_dir(self, key: str) -> Path:
        """`eval/<key>/`: the evaluation against the gold standard `key`."""
        return self._inside(self._eval / safe_name(key, "the evaluation key"))

    def require_final_model(self) -> None:
        if not self.final_model.is_file() or not self.selection.is_file():
            raise FileNotFoundError(
                f"no final model in {self.path}. Train it first with the same dataset/model/optimizer/"
                f"train/selection overrides: `python train.py <your overrides>` "
                f"(or point paths.runs_dir / TDA_RUNS_DIR at the folder that holds it).")


def _subdirectories(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir()) if path.is_dir() else []


def compare_dir(cfg: DictConfig, name: str) -> Path:
    """`compare/<name>/` under paths.runs_dir: a comparison of several experiments (tda.evaluation.compare)."""
    root = runs_root(cfg)
    return inside(root, root / "compare" / name)
