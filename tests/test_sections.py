"""Typed config sections (tda.sections, the fields of tda.preflight.Settings): conf/common.yaml holds
exactly their fields and defaults, every section is one of them (or nested in one), every setting has
a help text and a place in the key, no code in tda restates a setting's default, and a section checks
itself when built."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import pkgutil
import typing

import pytest
from helpers.config import ROOT, compose_config

import tda
from tda.config import ConfigError, to_container
from tda.further_training.settings import FurtherTrainingSettings
from tda.preflight import SECTIONS, Settings
from tda.sections import KEY_ROLES, Section
from tda.training import TrainerSettings, TrainSettings


def _nested(section: type[Section]) -> list[type[Section]]:
    """The section and every section nested in it."""
    hints = typing.get_type_hints(section)
    inner = [h for f in dataclasses.fields(section) if isinstance(h := hints[f.name], type) and issubclass(h, Section)]
    return [section] + [s for h in inner for s in _nested(h)]


ALL_SECTIONS = [s for top in SECTIONS.values() for s in _nested(top)]


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


def test_every_setting_says_what_it_is_and_its_place_in_the_key():
    for section in ALL_SECTIONS:
        for f in dataclasses.fields(section):
            assert f.metadata.get("help"), f"{section.__name__}.{f.name} has no help text"
            assert f.metadata.get("key") in KEY_ROLES, f"{section.__name__}.{f.name} was not declared with setting()"


def test_every_section_is_read_from_the_config():
    """A Section defined anywhere in tda is a field of Settings or nested in one: none is built
    from the config behind the pre-flight's back."""
    for module in pkgutil.walk_packages(tda.__path__, "tda."):
        importlib.import_module(module.name)
    defined = {cls for cls in _subclasses(Section) if cls.__module__.startswith("tda.")}
    assert defined == set(ALL_SECTIONS)
    assert {f.name for f in dataclasses.fields(Settings)} == set(SECTIONS) | {"seed"}
    for section in ALL_SECTIONS:
        assert section.PATH, section


def _subclasses(cls: type) -> set[type]:
    return {c for sub in cls.__subclasses__() for c in {sub} | _subclasses(sub)}


def test_no_default_is_restated_in_code():
    """A setting's default lives in its dataclass (and, equal by the test above, in the YAML):
    no `<node>.get("<setting>", <default>)` in tda. Reading a recorded dict that leaves a setting
    out at its default takes the dataclass's (`Section.default`)."""
    names = {f.name for section in ALL_SECTIONS for f in dataclasses.fields(section)}
    restated = []
    for path in sorted((ROOT / "tda").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                    and len(node.args) == 2 and isinstance(node.args[0], ast.Constant) and node.args[0].value in names
                    and not (isinstance(node.args[1], ast.Call) and isinstance(node.args[1].func, ast.Attribute)
                             and node.args[1].func.attr == "default")):
                restated.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not restated


def test_keyed_settings_leave_out_what_does_not_define_the_artifact():
    ft = FurtherTrainingSettings(engine="reference", shard_seeds=[1], n_seeds=2)
    assert "engine" not in ft.keyed() and "shard_seeds" not in ft.keyed() and "estimator" not in ft.keyed()
    assert FurtherTrainingSettings(estimator="derivative", removal="mask").keyed()["estimator"] == "derivative"
    assert TrainSettings(overwrite=True).keyed() == TrainSettings().keyed()
    assert "final_checkpoint" in TrainSettings(final_checkpoint="best_loss").keyed()
    assert FurtherTrainingSettings.default("estimator") == FurtherTrainingSettings().estimator == "difference"


def test_a_section_checks_itself_when_built():
    with pytest.raises(ConfigError, match=r"further_training.n_seeds=0 must be positive; the gold standard averages"):
        FurtherTrainingSettings(n_seeds=0)
    with pytest.raises(ConfigError, match=r"train.epochs='3' is a str, but it must be a int \(default: 30\)"):
        TrainSettings(epochs="3")
    assert TrainSettings(dtype="bf16").precision == "bf16-mixed"
