"""A stage's pre-flight: every section of the composed config checked in one pass, before any
data is loaded, so that every problem is reported in one message; and the typed sections it
builds (:class:`Settings`), which the stage then reads and passes down.

Hydra already rejects unknown config groups and options (`method=grad_dott`) and overrides of
keys that do not exist (`train.epochz=3`). Each plain section is a typed dataclass defined
beside what it configures (its defaults and checks live there; :class:`Settings` lists them);
each `_target_` node is checked against its constructor (tda.config.target_problems). Checks
that need the data run when it is loaded (tda.stages.inputs.load_data).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tda.config import ConfigError, target_problems
from tda.evaluation.settings import EvaluateSettings
from tda.extras import missing_extras_message
from tda.further_training.settings import FurtherTrainingSettings
from tda.problem import AttributionSettings
from tda.ranges import SEED
from tda.runs import RunSettings
from tda.sections import Section
from tda.tracking import check_wandb_dir

# the nodes built with `_target_`
TARGET_NODES = ("dataset", "model", "optimizer", "further_optimizer", "method")
SEED_PROBLEM = "seed={!r} must be a non-negative integer (default: 0); pass e.g. seed=0"


@dataclasses.dataclass(frozen=True)
class Settings(RunSettings):
    """Every plain section of a composed config (conf/common.yaml), typed and checked: what a
    stage reads, built once by :func:`check_config` and passed down (`train`, `selection`,
    `trainer`, `seed`: tda.runs.RunSettings, the run directory's). A new section is a
    :class:`~tda.sections.Section` beside what it configures, its node in conf/common.yaml
    (tests/test_sections.py keeps the two equal) and a field here."""

    further_training: FurtherTrainingSettings
    attribution: AttributionSettings
    evaluate: EvaluateSettings

    @classmethod
    def load(cls, cfg: DictConfig) -> tuple[Settings | None, list[str]]:
        """(the settings, []) of a composed config, or (None, every problem of its sections)."""
        values: dict[str, Any] = {}
        problems: list[str] = []
        for name, section in SECTIONS.items():
            values[name], found = section.load(cfg.get(name))
            problems += found
        seed = cfg.get("seed")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            problems.append(SEED_PROBLEM.format(seed))
        elif SEED.problem("seed", seed):
            problems.append(SEED.problem("seed", seed))
        if not problems:  # the gold standard's size, from the selection's sizes (before the data is loaded)
            problems += values["further_training"].memory_problems(values["selection"].n_test,
                                                                   values["selection"].n_left_out)
        return (None, problems) if problems else (cls(seed=seed, **values), [])

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Settings:
        settings, problems = cls.load(cfg)
        if problems:
            raise ConfigError.listing("invalid settings", problems)
        return settings


# the plain sections of conf/common.yaml and the class that types each (the fields of Settings)
SECTIONS: dict[str, type[Section]] = {
    name: hint for name, hint in typing.get_type_hints(Settings).items()
    if isinstance(hint, type) and issubclass(hint, Section)}


def check_config(cfg: DictConfig, stage: str) -> Settings:
    """The typed sections of a composed config, or one :class:`ConfigError` listing every
    problem: a value that does not resolve, keys added with `+` that nothing reads, wrong types,
    impossible values. Cheap: no data is loaded, nothing is built. A dataset or model that needs
    a pip extra that is not installed is refused first, in one line naming the `pip install`
    (tda.extras); a W&B directory that cannot be written last (tda.tracking.check_wandb_dir)."""
    missing = missing_extras_message({key: cfg.get(key) for key in TARGET_NODES})
    if missing:
        raise ConfigError(missing)
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except Exception as err:  # a `${...}` that does not resolve, or a `???` left unset
        raise ConfigError(f"the configuration does not resolve: {err}. Set the missing value on the command line "
                          f"(key=value) or fix the interpolation.") from err
    settings, problems = Settings.load(cfg)
    for key in TARGET_NODES:
        node = cfg.get(key)
        if isinstance(node, DictConfig) and "_target_" in node:
            problems += target_problems(node, key)
    if problems:
        raise ConfigError.listing(f"invalid configuration for the {stage} stage", problems)
    check_wandb_dir(cfg)  # W&B's files where the config says, or a refusal before any work
    return settings
