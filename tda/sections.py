"""Typed config sections: each plain section of the config (`train`, `selection`, ...) is a
:class:`Section` dataclass defined beside what it configures, in the manner of kronfluence's
argument classes: its fields are the settings, each with its default, what it means and its
place in the key of what the section defines (:func:`setting`), and its :meth:`Section.check`
holds the section's value checks. Building one checks it and raises one ConfigError listing
every problem with its fix. A stage builds every section once (tda.preflight.check_config) and
passes the objects down: they, not the raw config nodes, are what the code reads."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import types
import typing
from typing import Any, ClassVar, Literal, TypeVar, Union

from tda.config import ConfigError, accepts, kind_of, to_container

# A setting's place in the key (a directory name, an artifact's recorded identity) of what its
# section defines (the run directory for `train` / `selection`, the gold standard for
# `further_training`); :meth:`Section.keyed` applies it.
KEYED = "keyed"  # part of the key: another value is another artifact
NOT_KEYED = "not keyed"  # says how, or which part of it, a job computes, not what it is
# added after artifacts had been keyed, with the default meaning what they were before it
# existed: left out of the key at its default, so existing directories keep their names
KEYED_UNLESS_DEFAULT = "keyed unless default"
KEY_ROLES = (KEYED, NOT_KEYED, KEYED_UNLESS_DEFAULT)


def setting(default: Any, help: str, fix: str = "", key: str = KEYED) -> Any:
    """A field of a :class:`Section`: its default, what it means, the fix a message about a bad
    value ends with (e.g. "null uses 1/n") and its place in the key (KEY_ROLES)."""
    if key not in KEY_ROLES:
        raise ValueError(f"key={key!r} is not one of {KEY_ROLES}")
    metadata = {"help": help, "fix": fix, "key": key}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: _copy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _copy(value: Any) -> Any:
    return dataclasses.replace(value) if dataclasses.is_dataclass(value) else type(value)(value)


S = TypeVar("S", bound="Section")


@dataclasses.dataclass(frozen=True)
class Section:
    """A plain config section (frozen: built once, read everywhere). Constructing one checks it:
    the types of its fields (from their annotations), then :meth:`check`; every problem goes into
    one ConfigError. Subclasses are `@dataclass(frozen=True)` too."""

    PATH: ClassVar[str] = ""  # where the section lives in the config, e.g. "evaluate.examples"

    def __post_init__(self) -> None:
        checks = Checks(self)
        self.check(checks)
        if checks.problems:
            raise ConfigError.listing(f"invalid {self.PATH} settings", checks.problems)

    def check(self, checks: "Checks") -> None:
        """The section's value checks (override); values of the wrong type are never passed on."""

    @classmethod
    def load(cls, node: Any) -> tuple[Any, list[str]]:
        """(the section, []) from a config node, or (None, every problem): keys that are not
        settings (added with `+`; with a "did you mean"), wrong types, impossible values."""
        values = to_container(node) if node is not None else {}
        if not isinstance(values, dict):
            return None, [f"{cls.PATH} must be a mapping of settings, got {values!r}; remove the override of "
                          f"{cls.PATH}"]
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        kwargs, problems = {}, []
        for key, value in values.items():
            if key not in fields:
                problems.append(unknown_key(f"{cls.PATH}.{key}", fields))
                continue
            hint = hints[key]
            if isinstance(hint, type) and issubclass(hint, Section):
                kwargs[key], sub = hint.load(value)
                problems += sub
                if kwargs[key] is None:
                    del kwargs[key]
            else:
                kwargs[key] = value
        try:
            return cls(**kwargs), problems
        except ConfigError as err:
            return None, problems + err.problems

    @classmethod
    def from_config(cls: type[S], node: Any) -> S:
        """The section of a config node (None: every default), or one ConfigError listing every problem."""
        section, problems = cls.load(node)
        if problems:
            raise ConfigError.listing(f"invalid {cls.PATH} settings", problems)
        return section

    @classmethod
    def default(cls, name: str) -> Any:
        """The default of the setting `name`: what a record that leaves it out (:meth:`keyed`) means."""
        f = next(f for f in dataclasses.fields(cls) if f.name == name)
        return f.default if f.default is not dataclasses.MISSING else f.default_factory()

    def keyed(self) -> dict[str, Any]:
        """The settings that define what the section configures, as plain values in field order:
        every KEYED setting, and each KEYED_UNLESS_DEFAULT one away from its default (NOT_KEYED
        ones are left out). What keys (and identities) hash and record."""
        out = {}
        for f in dataclasses.fields(self):
            role, value = f.metadata.get("key", KEYED), getattr(self, f.name)
            if role == NOT_KEYED or (role == KEYED_UNLESS_DEFAULT and value == self.default(f.name)):
                continue
            out[f.name] = value.keyed() if isinstance(value, Section) else copy.deepcopy(value)
        return out


def unknown_key(path: str, valid: Any, what: str = "a setting") -> str:
    """The message for a key nothing reads: a "did you mean" or the valid keys."""
    prefix, _, key = path.rpartition(".")
    hint = difflib.get_close_matches(key, [str(k) for k in valid], n=1)
    return (f"{path} is not {what} (added with `+`?); nothing reads it"
            + (f" — did you mean {prefix}.{hint[0]}?" if hint else f"; valid keys: {sorted(valid)}"))


class Checks:
    """The problems found in one section. A field's type is checked against its annotation when
    the section is built; the value checks below skip a value of the wrong type."""

    def __init__(self, section: Section):
        self.section = section
        self.problems: list[str] = []
        self._mistyped: set[str] = set()
        hints = typing.get_type_hints(type(section))
        for f in dataclasses.fields(section):
            problem = _type_problem(self.path(f.name), getattr(section, f.name), hints[f.name], f)
            if problem:
                self.problems.append(problem)
                self._mistyped.add(f.name)

    def path(self, name: str) -> str:
        return f"{self.section.PATH}.{name}"

    def value(self, name: str) -> Any:
        """The value of a field, or None when it is unset (null) or of the wrong type."""
        return None if name in self._mistyped else getattr(self.section, name)

    def fix(self, name: str) -> str:
        fix = next(f.metadata.get("fix", "") for f in dataclasses.fields(self.section) if f.name == name)
        return f"; {fix}" if fix else ""

    def add(self, problem: str) -> None:
        self.problems.append(problem)

    def _number(self, name: str) -> float | None:
        value = self.value(name)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        if not math.isfinite(value):
            self.add(f"{self.path(name)}={value} is not a finite number{self.fix(name)}")
            return None
        return value

    def positive(self, name: str) -> None:
        value = self._number(name)
        if value is not None and not value > 0:
            self.add(f"{self.path(name)}={value} must be positive{self.fix(name)}")

    def non_negative(self, name: str) -> None:
        value = self._number(name)
        if value is not None and value < 0:
            self.add(f"{self.path(name)}={value} must not be negative{self.fix(name)}")

    def within(self, name: str, low: float, high: float, why: str = "") -> None:
        value = self._number(name)
        if value is not None and not low <= value <= high:
            self.add(f"{self.path(name)}={value} must be in [{low}, {high}]{why}{self.fix(name)}")


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint) if h is not type(None))
    if origin is Literal:
        return " or ".join(repr(v) for v in typing.get_args(hint))
    if origin is list:
        return f"list of {_describe(typing.get_args(hint)[0])}"
    return getattr(hint, "__name__", str(hint))


def _type_problem(path: str, value: Any, hint: Any, f: dataclasses.Field) -> str | None:
    fix = f"; {f.metadata['fix']}" if f.metadata.get("fix") else ""
    if accepts(hint, value):
        return None
    if value is None:
        return f"{path} must be set, got null{fix}"
    literal = [h for h in (typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,))
               if typing.get_origin(h) is Literal]
    if literal and len(literal) == 1 and literal[0] is hint:
        return f"{path}={value!r} is not one of {list(typing.get_args(hint))}{fix}"
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    example = str(default).lower() if isinstance(default, bool) else json.dumps(default).replace(" ", "")
    example = example.replace('"', "")
    return (f"{path}={value!r} is a {kind_of(value)}, but it must be a {_describe(hint)} (default: {default!r}); "
            f"pass e.g. {path}={'null' if default is None else example}")
