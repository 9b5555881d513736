"""Helpers around Hydra/OmegaConf: stable hashes of config nodes, building `_target_` nodes and
names that become directories, each refusing bad input with a :class:`ConfigError` that names
the fix. (Plain sections such as `train` are typed in tda.sections.)

A node that describes a pluggable object carries `_target_` plus an optional `name` (used for
run-directory names, W&B tags and plot legends; not passed to the constructor). Its keys are
checked against the constructor's signature (:func:`target_problems`) when it is built.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import inspect
import json
import re
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, Union

from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from tda.exits import UserError
from tda.ranges import SEED, Range, count, magnitude_problem, memory_problem


class ConfigError(UserError, ValueError):
    """A configuration that cannot work; the message lists every problem with its fix
    (`problems`: one entry per problem)."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems) if problems is not None else [message]

    @classmethod
    def listing(cls, header: str, problems: list[str]) -> "ConfigError":
        return cls(f"{header}:\n  - " + "\n  - ".join(problems), problems)


def to_container(cfg: Any) -> Any:
    """Resolved plain-Python copy of a config node (never `${...}` strings)."""
    if isinstance(cfg, DictConfig) or OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def config_hash(*nodes: Any, length: int = 8) -> str:
    """Deterministic short hash of resolved config nodes (key order does not matter)."""
    payload = json.dumps([to_container(n) for n in nodes], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:length]


# ------------------------------------------------------------------------------ types
def kind_of(value: Any) -> str:
    """The kind of a config value, as messages name it: bool, int, float, str, list, dict."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (list, tuple, ListConfig)):
        return "list"
    if isinstance(value, (dict, DictConfig)):
        return "dict"
    return type(value).__name__


def accepts(hint: Any, value: Any) -> bool:
    """Whether a config value fits a type annotation (Any, unions, Literal, list[...], int /
    float / bool / str, where an int fits a float and a bool fits neither)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (Union, types.UnionType):
        return any(accepts(h, value) for h in typing.get_args(hint))
    if origin is Literal:
        return any(value == choice and type(value) is type(choice) for choice in typing.get_args(hint))
    if origin is list or hint is list:
        item = (typing.get_args(hint) or (Any,))[0]
        return isinstance(value, (list, tuple)) and all(accepts(item, v) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


# ------------------------------------------------------------------------------ _target_ nodes
def import_target(target: str) -> Any:
    """The object a `_target_` names (module.attr, or module.Class.method), or None."""
    parts = str(target).split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for part in parts[i:]:
                obj = getattr(obj, part)
            return obj
        except AttributeError:
            return None
    return None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _widths(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and all(_is_int(w) and w > 0 for w in v)


# Constructor arguments that mean the same whichever `_target_` takes them (torch's optimizers,
# tda's datasets and models): name -> (the check, the message if it fails), or a Range. Null is
# left to the constructor (e.g. max_train=null keeps every row), except for `lr`. A constructor
# declares the range of its own arguments beside them (`Annotated[int, Range(...)]`, tda.ranges).
ARGUMENT_RULES: dict[str, tuple[Callable[[Any], bool], str] | Range] = {
    "lr": (lambda v: v > 0, "must be positive; e.g. {key}=1e-3"),
    "eps": (lambda v: v > 0, "must be positive"),
    "momentum": Range(0, 1, high_open=True, why=" (the fraction of the last update kept; 1 or more never decays)"),
    "dampening": Range(0, 1, why=" (the fraction of the gradient held back from the momentum)"),
    "weight_decay": (lambda v: v >= 0, "must not be negative"),
    "test_size": (lambda v: 0 < v < 1, "must be below 1 (and positive); it is the test fraction, e.g. 0.25"),
    "max_train": (lambda v: v > 0, "must be positive; null keeps every row"),
    "max_test": (lambda v: v > 0, "must be positive; null keeps every row"),
    "dropout": (lambda v: 0 <= v < 1, "must be below 1 (and not negative)"),
    "betas": (lambda v: len(v) == 2 and all(_is_number(b) and 0 <= b < 1 for b in v),
              "must be two numbers in [0, 1), e.g. {key}=[0.9,0.999]"),
    "hidden": (_widths, "must be a list of positive layer widths, e.g. {key}=[128,128]"),
    "channels": (_widths, "must be a list of positive layer widths, e.g. {key}=[8,16]"),
    "seed": SEED, "split_seed": SEED, "subsample_seed": SEED,
    # sizes and iteration counts of the methods and models
    **{name: count(what) for name, what in [
        ("batch_size", "rows per batch"), ("chunk_size", "rows per chunk of per-example gradients"),
        ("max_train_rows_per_chunk", "training rows per chunk"), ("micro_batch", "rows per forward pass"),
        ("maxiter", "iterations"), ("n_iters", "iterations"), ("depth", "recursion steps"),
        ("repeat", "repetitions"), ("top_k", "eigenpairs kept"), ("proj_dim", "projection dimensions"),
        ("trainable_k", "blocks trained"), ("max_length", "tokens per sentence")]},
    "damping": Range(0, why=" (λ added to the curvature; 0: none)"),
    "damping_multiple": Range(0, why=" (λ = this × the curvature's mean eigenvalue; 0: none)"),
    "c": Range(0, low_open=True, why=" (λ_l = mean squared gradient / c)"),
    "tol": Range(0, 1, low_open=True, high_open=True, why=" (the relative residual at which to stop)", example=1e-6),
    # LiSSA's guard: the recursion converges to at most s‖g‖/λ (factor 1); a factor far above
    # that lets a diverging recursion pass as converged
    "divergence_factor": Range(1, 1e3, why=" (the converged recursion is bounded by factor 1; a larger factor "
                                            "lets diverged scores through)", example=10),
    "scale": Range(0, low_open=True, why=" (a multiplier: LiSSA's s, ResNet-9's logit scale)"),
    "scales": (lambda v: all(_is_number(s) and s > 0 for s in v), "must hold positive scales, e.g. {key}=[10,50]"),
    "width": Range(0, low_open=True, why=" (the multiple of the standard layer widths)"),
}


def _hints(obj: Any) -> dict[str, Any]:
    """The resolved annotations of a constructor's parameters, `Annotated` ranges kept ({} when
    they cannot be resolved, e.g. a third-party signature)."""
    try:
        return typing.get_type_hints(obj.__init__ if isinstance(obj, type) else obj, include_extras=True)
    except Exception:  # noqa: BLE001 - a library's annotations may name what its module never imports
        return {}


def declared_range(hint: Any) -> Range | None:
    """The Range in an `Annotated[..., Range(...)]` annotation, or None."""
    if typing.get_origin(hint) is typing.Annotated:
        return next((a for a in hint.__metadata__ if isinstance(a, Range)), None)
    return None


def _param_kind(p: inspect.Parameter, hint: Any = None) -> Any:
    """int / float / bool when a constructor parameter clearly wants one of them (its annotation
    is one of them, or one of them or None), else None."""
    names = {"int": int, "float": float, "bool": bool}
    ann = hint if hint is not None else names.get(p.annotation, p.annotation)
    if typing.get_origin(ann) is typing.Annotated:
        ann = typing.get_args(ann)[0]
    if typing.get_origin(ann) in (Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        ann = args[0] if len(args) == 1 else None
    if ann in (int, float, bool):  # not str: a string is often one choice among kinds (`auto` | true)
        return ann
    d = p.default
    if _is_number(d) or isinstance(d, bool):
        return bool if isinstance(d, bool) else float  # SGD's momentum=0 must still accept 0.9
    return None


def target_problems(node: Any, key: str) -> list[str]:
    """What is wrong with a `_target_` node `key` (e.g. `optimizer`): a target that cannot be
    imported, keys that are not constructor parameters (with a "did you mean"), values of the
    wrong type (from the parameter's annotation or default), numbers that are not finite, and
    values outside their range (ARGUMENT_RULES, the Range a parameter declares, and for a class
    with an `argument_problems(arguments, key)` classmethod, what it finds in the arguments with
    the constructor's defaults filled in: a range that depends on other arguments). Cheap:
    imports the target, builds nothing."""
    values = dict(to_container(node))
    target = values.get("_target_")
    obj = import_target(str(target))
    if obj is None:
        return [f"{key}._target_={target!r} cannot be imported; check the spelling in conf/{key}/*.yaml or pick "
                f"another {key}=..."]
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        params = None
    hints = _hints(obj)
    open_ended = params is None or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    problems = []
    for arg, value in values.items():
        if arg.startswith("_") or arg == "name":
            continue
        path = f"{key}.{arg}"
        if not open_ended and arg not in params:
            accepted = [p for p in params if p not in ("self", "params", "input_shape", "n_outputs")]
            hint = difflib.get_close_matches(arg, accepted, n=1)
            problems.append(f"{path} is not a parameter of {target}"
                            + (f" — did you mean {key}.{hint[0]}?" if hint else f"; it accepts {accepted}"))
            continue
        kind = _param_kind(params[arg], hints.get(arg)) if params is not None and arg in params else None
        if value is not None and kind is not None and not accepts(kind, value):
            default = params[arg].default
            shown = default if default is not inspect.Parameter.empty else kind.__name__
            problems.append(f"{path}={value!r} is a {kind_of(value)}, but it must be a {kind.__name__} (default: "
                            f"{shown!r}); pass e.g. {path}={shown}")
            continue
        magnitude = magnitude_problem(path, value)  # NaN / inf / 1e300 is never a setting
        if magnitude:
            problems.append(magnitude)
            continue
        problem = _rule_problem(path, arg, value) or (declared_range(hints.get(arg)) or Range()).problem(path, value)
        if problem:
            problems.append(problem)
    if not problems and isinstance(obj, type) and hasattr(obj, "argument_problems"):
        # the constructor's defaults under the given values: a class states each default once, in its signature
        defaults = {name: p.default for name, p in (params or {}).items() if p.default is not inspect.Parameter.empty}
        problems += obj.argument_problems({**defaults, **values}, key)
    return problems


def _rule_problem(path: str, arg: str, value: Any) -> str | None:
    """What ARGUMENT_RULES says of an argument named `arg` (None: nothing wrong, or no rule)."""
    rule = ARGUMENT_RULES.get(arg)
    if rule is None:
        return None
    if isinstance(rule, Range):
        return rule.problem(path, value)
    check, why = rule
    if value is None:
        return f"{path} must be set, got null; e.g. {path}=1e-3" if arg == "lr" else None
    try:
        ok = bool(check(value))
    except TypeError:  # e.g. a list where a number belongs: the type check above names it
        ok = False
    if ok and arg in ("hidden", "channels"):
        return _widths_memory(path, value)
    return None if ok else f"{path}={value!r} {why.format(key=path)}"


def _widths_memory(path: str, widths: list[int]) -> str | None:
    """The weights between consecutive layers of these widths (a lower bound on the model's
    parameters: in float32, before inputs, outputs and kernels) against this machine's memory."""
    n = sum(a * b for a, b in zip(widths[:-1], widths[1:])) + max(widths)
    return memory_problem(f"{path}={widths}", 4.0 * n, f"at least {n:.3g} weights",
                          "use narrower layers, e.g. the default widths")


def build(node: DictConfig | dict, key: str | None = None, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate` without the descriptive `name` key, after checking the node
    against its constructor (:func:`target_problems`; `key` names it in the message)."""
    plain = dict(to_container(node))
    problems = target_problems(plain, key or _own_key(node))
    if problems:
        raise ConfigError.listing(f"invalid {key or _own_key(node)} settings", problems)
    plain.pop("name", None)
    return instantiate(_float_tuples(plain), **kwargs)


def _float_tuples(node: dict) -> dict:
    """`node` with each list of numbers, not all floats, whose constructor default is a tuple of
    floats given as that: YAML reads `betas: [0, 0.999]` as an int and a float, which torch's Adam refuses
    ("betas must be either both floats or both Tensors")."""
    target = import_target(node["_target_"]) if "_target_" in node else None
    try:
        params = inspect.signature(target).parameters if target is not None else {}
    except (TypeError, ValueError):  # a builtin without a signature
        return node
    out = dict(node)
    for name, value in node.items():
        default = params[name].default if name in params else None
        if (isinstance(default, tuple) and default and all(isinstance(d, float) for d in default)
                and isinstance(value, (list, tuple)) and all(_is_number(v) for v in value)
                and not all(isinstance(v, float) for v in value)):
            out[name] = tuple(float(v) for v in value)
    return out


def _own_key(node: Any) -> str:
    own = node._key() if isinstance(node, DictConfig) else None
    return str(own) if own is not None else "the node"


# ------------------------------------------------------------------------------ names
# Names from the config become path components (run / gold / method / eval / compare directories)
# and W&B names, so they are restricted to characters that are safe in a file name on every
# platform and cannot climb out of paths.runs_dir: letters, digits and . _ - + = , ( ) — no
# path separator, no whitespace, not empty, not starting with '.' (hidden, '.', '..') or '-'
# (read as an option), at most 100 characters.
SAFE_NAME = re.compile(r"[A-Za-z0-9_+=,()][A-Za-z0-9._+=,()-]{0,99}")
SAFE_NAME_RULE = ("letters, digits and . _ - + = , ( ) only, not starting with '.' or '-', "
                  "at most 100 characters")


def safe_name(value: Any, key: str, fix_key: str | None = None) -> str:
    """`value` as a directory-name-safe string (see SAFE_NAME), or a ConfigError naming `key`,
    the value and the fix (set `fix_key`, default `key`, to a safe name)."""
    text = str(value)
    if value is None or not SAFE_NAME.fullmatch(text):
        raise ConfigError(f"{key}={text!r} cannot name a directory under paths.runs_dir (it becomes a path "
                          f"component of the run directory and the W&B names); set {fix_key or key} to a name of "
                          f"{SAFE_NAME_RULE}, e.g. {fix_key or key}={_suggest(text)}")
    return text


def _suggest(text: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._+=,()-]+", "_", text).lstrip("._-")[:100]
    return cleaned or "my_name"


def node_name(node: DictConfig | dict, default: str = "unnamed", key: str | None = None) -> str:
    """The short name of a `_target_` node: its `name`, else the lower-cased class name of
    `_target_`. Always directory-name safe (see SAFE_NAME): an unsafe or empty one raises a
    ConfigError naming `key` (default: the node's own key in the config, e.g. `dataset`)."""
    if key is None:
        key = _own_key(node)
    name = node.get("name") if node is not None else None
    if name is not None:
        return safe_name(name, f"{key}.name")
    target = node.get("_target_", default) if node is not None else default
    return safe_name(str(target).rsplit(".", 1)[-1].lower(), f"{key}._target_ (no {key}.name)", f"{key}.name")
