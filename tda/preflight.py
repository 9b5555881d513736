"""A stage's pre-flight: every section of the composed config checked in one pass, before any
data is loaded, so that every problem is reported in one message.

Hydra already rejects unknown config groups and options (`method=grad_dott`) and overrides of
keys that do not exist (`train.epochz=3`). Each plain section is a typed dataclass defined
beside what it configures (its defaults and checks live there, see :data:`SECTIONS`); each
`_target_` node is checked against its constructor (tda.config.target_problems). Checks that
need the data run when it is loaded (tda.stages.load_data).
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from tda.config import ConfigError, target_problems
from tda.evaluation.settings import EvaluateSettings
from tda.extras import missing_extras_message
from tda.further_training.settings import FurtherTrainingSettings
from tda.problem import AttributionSettings
from tda.sections import Section
from tda.selection import SelectionSettings
from tda.training import TrainerSettings, TrainSettings

# the plain sections of conf/common.yaml and the class that types each
SECTIONS: dict[str, type[Section]] = {
    "train": TrainSettings, "selection": SelectionSettings, "further_training": FurtherTrainingSettings,
    "attribution": AttributionSettings, "trainer": TrainerSettings, "evaluate": EvaluateSettings,
}
# the nodes built with `_target_`
TARGET_NODES = ("dataset", "model", "optimizer", "further_optimizer", "method")


def check_config(cfg: DictConfig, stage: str) -> None:
    """Raise one :class:`ConfigError` listing every problem of a composed config: a value that
    does not resolve, keys added with `+` that nothing reads, wrong types, impossible values.
    Cheap: no data is loaded, nothing is built. A dataset or model that needs a pip extra that
    is not installed is refused first, in one line naming the `pip install` (tda.extras)."""
    missing = missing_extras_message({key: cfg.get(key) for key in TARGET_NODES})
    if missing:
        raise ConfigError(missing)
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except Exception as err:  # a `${...}` that does not resolve, or a `???` left unset
        raise ConfigError(f"the configuration does not resolve: {err}. Set the missing value on the command line "
                          f"(key=value) or fix the interpolation.") from err
    problems: list[str] = []
    for key, section in SECTIONS.items():
        if key in cfg:
            problems += section.load(cfg[key])[1]
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        problems.append(f"seed={seed!r} must be a non-negative integer (default: 0); pass e.g. seed=0")
    for key in TARGET_NODES:
        node = cfg.get(key)
        if isinstance(node, DictConfig) and "_target_" in node:
            problems += target_problems(node, key)
    if problems:
        raise ConfigError.listing(f"invalid configuration for the {stage} stage", problems)
