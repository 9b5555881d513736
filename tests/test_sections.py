"""Typed config sections (tda.sections, listed in tda.preflight.SECTIONS): conf/common.yaml holds
exactly their fields and defaults, every setting has a help text, and a section checks itself when
built."""

from __future__ import annotations

import dataclasses

import pytest
from helpers.config import compose_config

from tda.config import ConfigError, to_container
from tda.further_training.settings import FurtherTrainingSettings
from tda.preflight import SECTIONS
from tda.sections import Section
from tda.training import TrainerSettings, TrainSettings


def _defaults_and_yaml(section: type[Section], yaml: dict, path: str) -> list[str]:
    """Where conf/common.yaml and the section's dataclass disagree: keys and default values."""
    fields = {f.name: f for f in dataclasses.fields(section)
              if not (section is TrainerSettings and f.name == "lightning")}  # `+trainer.<argument>` only
    default = section()
    drift = [f"{path}.{k}: in the YAML, not in {section.__name__}" for k in yaml if k not in fields]
    drift += [f"{path}.{k}: in {section.__name__}, not in the YAML" for k in fields if k not in yaml]
    for name in set(fields) & set(yaml):
        value = getattr(default, name)
        if isinstance(value, Section):
            drift += _defaults_and_yaml(type(value), yaml[name], f"{path}.{name}")
        elif value != yaml[name] or type(value) is not type(yaml[name]) and not isinstance(value, float):
            drift.append(f"{path}.{name}: YAML {yaml[name]!r}, {section.__name__} {value!r}")
    return drift


def test_yaml_defaults_equal_the_dataclass_defaults():
    cfg = compose_config("train")
    drift = []
    for key, section in SECTIONS.items():
        drift += _defaults_and_yaml(section, to_container(cfg[key]), key)
    assert not drift


def test_every_setting_says_what_it_is():
    for section in list(SECTIONS.values()):
        for f in dataclasses.fields(section):
            assert f.metadata.get("help"), f"{section.__name__}.{f.name} has no help text"


def test_a_section_checks_itself_when_built():
    with pytest.raises(ConfigError, match=r"further_training.n_seeds=0 must be positive; the gold standard averages"):
        FurtherTrainingSettings(n_seeds=0)
    with pytest.raises(ConfigError, match=r"train.epochs='3' is a str, but it must be a int \(default: 30\)"):
        TrainSettings(epochs="3")
    assert TrainSettings(dtype="bf16").precision == "bf16-mixed"
