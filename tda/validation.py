"""Pre-flight checks: bad input is reported in one message, naming the problem and the fix,
before any long work starts.

Hydra already rejects unknown config groups and options (`method=grad_dott`) and overrides of
keys that do not exist (`train.epochz=3`). What it cannot see is checked here:

- :func:`validate_config` (at the start of every stage, before any data is loaded):
  keys added with `+` that nothing reads (for the plain sections, against the keys that
  `conf/common.yaml` defines; for `_target_` nodes, against the constructor's parameters),
  values of the wrong type, and impossible values (negative learning rate, zero seeds,
  zero epochs, ...). Every problem found is listed in the one error.
- :func:`validate_devices` (before the data is loaded): a CUDA accelerator or attribution
  device asked for on a machine without CUDA.
- :func:`validate_data` (right after the data is loaded, before training): empty splits,
  selections larger than the data (more left-out instances than training rows), NaN/inf
  inputs or targets and out-of-range class labels (named by split and column), and a model
  that cannot take the data's inputs (a CNN on tabular data).
- :func:`data_errors` wraps dataset loading and turns the usual failures (offline with
  nothing cached, an empty data file) into the same kind of message.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# Top-level nodes that are plain settings (not `_target_` objects) and are defined in common.yaml.
PLAIN_SECTIONS = ("train", "selection", "further_training", "attribution", "trainer", "evaluate")
# Top-level nodes built with `_target_`; their keys are checked against the constructor.
TARGET_SECTIONS = ("dataset", "model", "optimizer", "further_optimizer", "method")
REMOVAL_MODES = ("drop", "downweight", "mask")


class ConfigError(ValueError):
    """A configuration that cannot work; the message lists every problem with its fix."""


# ------------------------------------------------------------------------------ config
def validate_config(cfg: DictConfig, stage: str) -> None:
    """Raise :class:`ConfigError` listing every problem of a composed config (cheap: no
    data is loaded, nothing is built)."""
    problems: list[str] = []
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except Exception as err:  # a `${...}` that does not resolve, or a `???` left unset
        raise ConfigError(f"the configuration does not resolve: {err}. Set the missing value on the command line "
                          f"(key=value) or fix the interpolation.") from err
    problems += _plain_section_problems(cfg)
    problems += _target_problems(cfg)
    problems += _value_problems(cfg)
    if problems:
        raise ConfigError(f"invalid configuration for the {stage} stage:\n  - " + "\n  - ".join(problems))


def _reference_sections() -> dict[str, Any]:
    """The plain sections as conf/common.yaml defines them (their keys and default types)."""
    raw = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "common.yaml"), resolve=False)
    ref = {k: v for k, v in raw.items() if k not in ("defaults", "hydra")}
    # a plain section may also be a config group (conf/<section>/*.yaml): any of its options'
    # keys is a valid key
    for section in PLAIN_SECTIONS:
        group = CONF_DIR / section
        if group.is_dir():
            for option in sorted(group.glob("*.yaml")):
                node = OmegaConf.to_container(OmegaConf.load(option), resolve=False) or {}
                node = {k: v for k, v in node.items() if k != "defaults"}
                merged = dict(ref.get(section) or {})
                for k, v in node.items():
                    merged.setdefault(k, v)
                ref[section] = merged
    return ref


def _kind(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, (list, tuple, ListConfig)):
        return "list"
    if isinstance(value, (dict, DictConfig)):
        return "dict"
    return type(value).__name__


# settings whose default's type is only one of the kinds they accept
ANY_KIND = {"trainer.devices", "trainer.accelerator", "trainer.strategy"}


def _compatible(expected: str | None, value: Any) -> bool:
    got = _kind(value)
    # a string default is often one choice among kinds (`auto` | true | false), so it constrains nothing
    if expected in (None, "str") or got is None or expected == got:
        return True
    return expected == "float" and got == "int"


def _plain_section_problems(cfg: DictConfig) -> list[str]:
    ref = _reference_sections()
    problems = []
    for section in PLAIN_SECTIONS:
        if section not in cfg or not isinstance(ref.get(section), dict):
            continue
        node = OmegaConf.to_container(cfg[section], resolve=True)
        if not isinstance(node, dict):
            problems.append(f"{section} must be a mapping of settings, got {node!r}; remove the override of `{section}`")
            continue
        problems += _compare_to_reference(section, node, ref[section])
    for key in ("seed",):
        if key in cfg and key in ref and not _compatible(_kind(ref[key]), cfg[key]):
            problems.append(_type_message(key, cfg[key], _kind(ref[key]), ref[key]))
    return problems


def _compare_to_reference(prefix: str, node: dict, ref: dict) -> list[str]:
    problems = []
    for key, value in node.items():
        path = f"{prefix}.{key}"
        if key not in ref:
            hint = difflib.get_close_matches(str(key), [str(k) for k in ref], n=1)
            problems.append(f"{path} is not a setting (added with `+`?); nothing reads it"
                            + (f" — did you mean {prefix}.{hint[0]}?" if hint else f"; valid keys: {sorted(ref)}"))
            continue
        default = ref[key]
        if (isinstance(default, str) and default.startswith("${")) or path in ANY_KIND:
            continue
        if isinstance(default, dict) and isinstance(value, dict):
            problems += _compare_to_reference(path, value, default)
        elif not _compatible(_kind(default), value):
            problems.append(_type_message(path, value, _kind(default), default))
    return problems


def _type_message(path: str, value: Any, expected: str | None, default: Any) -> str:
    return (f"{path}={value!r} is a {_kind(value)}, but it must be a {expected} (default: {default!r}); "
            f"pass e.g. {path}={_example(default)}")


def _example(default: Any) -> str:
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, (list, tuple)):
        return "[" + ",".join(str(v) for v in default) + "]"
    return str(default)


def _import_target(target: str) -> Any:
    module, _, attr = target.rpartition(".")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj
    except (ImportError, AttributeError, ValueError):
        # nested attributes (module.Class.method): walk down from the longest importable prefix
        parts = target.split(".")
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


def _target_problems(cfg: DictConfig) -> list[str]:
    problems = []
    for section in TARGET_SECTIONS:
        if section not in cfg or cfg[section] is None or "_target_" not in cfg[section]:
            continue
        node = OmegaConf.to_container(cfg[section], resolve=True)
        target = node["_target_"]
        obj = _import_target(str(target))
        if obj is None:
            problems.append(f"{section}._target_={target!r} cannot be imported; check the spelling in "
                            f"conf/{section}/*.yaml or pick another {section}=...")
            continue
        try:
            sig = inspect.signature(obj)
        except (TypeError, ValueError):
            continue
        params = sig.parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            continue
        for key, value in node.items():
            if key.startswith("_") or key == "name":
                continue
            if key not in params:
                accepted = [p for p in params if p not in ("self", "params", "input_shape", "n_outputs")]
                hint = difflib.get_close_matches(key, accepted, n=1)
                problems.append(f"{section}.{key} is not a parameter of {target}"
                                + (f" — did you mean {section}.{hint[0]}?" if hint else f"; it accepts {accepted}"))
                continue
            expected = _param_kind(params[key])
            if expected is not None and value is not None and not _compatible(expected, value):
                problems.append(_type_message(f"{section}.{key}", value, expected, params[key].default
                                              if params[key].default is not inspect.Parameter.empty else expected))
    return problems


def _param_kind(p: inspect.Parameter) -> str | None:
    """int / float / bool / str when a constructor parameter clearly wants one of them."""
    ann = p.annotation
    names = {int: "int", float: "float", bool: "bool", str: "str", "int": "int", "float": "float", "bool": "bool", "str": "str"}
    if ann in names:
        return names[ann]
    d = p.default
    if d is not inspect.Parameter.empty and d is not None and _kind(d) in ("int", "float", "bool"):
        # a default of 0 for a float parameter (SGD's momentum) must still accept 0.9
        return "float" if _kind(d) == "int" else _kind(d)
    return None


def _get(cfg: DictConfig, path: str, default: Any = None) -> Any:
    return OmegaConf.select(cfg, path, default=default)


def _value_problems(cfg: DictConfig) -> list[str]:
    problems: list[str] = []

    def number(path: str, *, positive: bool = False, nonneg: bool = False, integer: bool = False,
               nullable: bool = False, below_one: bool = False, fix: str = "") -> None:
        if OmegaConf.select(cfg, path, default="__absent__") == "__absent__":
            return
        value = _get(cfg, path)
        if value is None:
            if not nullable:
                problems.append(f"{path} must be set, got null{fix}")
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
            return  # wrong types are reported by the type checks
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{path}={value} is not a finite number{fix}")
        elif positive and not value > 0:
            problems.append(f"{path}={value} must be positive{fix}")
        elif nonneg and value < 0:
            problems.append(f"{path}={value} must not be negative{fix}")
        elif below_one and not value < 1:
            problems.append(f"{path}={value} must be below 1{fix}")

    def choice(path: str, allowed: tuple, nullable: bool = False, fix: str = "") -> None:
        value = _get(cfg, path, default="__absent__")
        if value == "__absent__" or (value is None and nullable):
            return
        if value not in allowed:
            problems.append(f"{path}={value!r} is not one of {list(allowed)}{fix}")

    number("seed", nonneg=True, integer=True)
    number("train.epochs", positive=True, integer=True, fix="; train for at least one epoch")
    number("train.batch_size", positive=True, integer=True)
    # float16 mixed precision is not offered: Lightning silently runs it as bf16 on a CPU
    choice("train.dtype", ("float32", "float64", "bf16"), fix="; for mixed precision use train.dtype=bf16")
    number("train.gradient_clip_val", positive=True, nullable=True)
    number("train.eval_every_epochs", positive=True, integer=True)
    number("selection.n_left_out", positive=True, integer=True, nullable=True, fix="; null attributes every training row")
    number("selection.n_test", positive=True, integer=True, nullable=True, fix="; null evaluates every test instance")
    number("selection.seed", nonneg=True, integer=True)
    choice("selection.test", ("first", "random"))
    number("further_training.epochs", positive=True, integer=True, fix="; further-train for at least one epoch")
    number("further_training.batch_size", positive=True, integer=True)
    number("further_training.n_seeds", positive=True, integer=True,
           fix="; the gold standard averages over seeds (the paper: 100; 10-20 capture most of the benefit)")
    number("further_training.seed_offset", nonneg=True, integer=True)
    choice("further_training.removal", REMOVAL_MODES)
    number("further_training.checkpoint_every_steps", positive=True, integer=True, nullable=True,
           fix="; null puts a checkpoint after every epoch")
    number("further_training.epsilon", positive=True, nullable=True, fix="; null uses 1/n")
    number("further_training.clip_grad_norm", positive=True, nullable=True, fix="; null disables clipping")
    choice("further_training.dtype", ("float32", "float64"))
    number("further_training.max_runs_per_group", positive=True, integer=True, nullable=True,
           fix="; null trains as many runs at once as attribution.memory_budget_mb allows")
    number("attribution.memory_budget_mb", positive=True)
    for opt in ("optimizer", "further_optimizer"):
        number(f"{opt}.lr", positive=True, fix=f"; e.g. {opt}.lr=1e-3")
        number(f"{opt}.momentum", nonneg=True)
        number(f"{opt}.dampening", nonneg=True)
        number(f"{opt}.weight_decay", nonneg=True)
        number(f"{opt}.eps", positive=True)
        betas = _get(cfg, f"{opt}.betas")
        if betas is not None:
            betas = list(betas) if isinstance(betas, (list, tuple, ListConfig)) else betas
            if not (isinstance(betas, list) and len(betas) == 2
                    and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
                problems.append(f"{opt}.betas={betas!r} must be two numbers in [0, 1), e.g. {opt}.betas=[0.9,0.999]")
    number("dataset.test_size", positive=True, below_one=True, fix="; it is the test fraction, e.g. 0.25")
    number("dataset.max_train", positive=True, integer=True, nullable=True, fix="; null keeps every row")
    number("dataset.max_test", positive=True, integer=True, nullable=True, fix="; null keeps every row")
    number("model.dropout", nonneg=True, below_one=True)
    for path in ("model.hidden", "model.channels"):
        widths = _get(cfg, path)
        if widths is not None and isinstance(widths, ListConfig):
            if not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths):
                problems.append(f"{path}={list(widths)} must be a list of positive layer widths, e.g. {path}=[128,128]")
    devices = _get(cfg, "trainer.devices")
    if devices is not None and not (devices == "auto" or (isinstance(devices, int) and not isinstance(devices, bool)
                                                          and devices != 0 and devices >= -1)
                                    or isinstance(devices, (ListConfig, str))):
        problems.append(f"trainer.devices={devices!r} must be a positive count, -1 (all), 'auto' or a list of ids")
    number("evaluate.examples.k", positive=True, integer=True,
           fix="; it is the number of helpful and harmful instances shown per test instance "
               "(to show no examples, set evaluate.examples.n_test=0)")
    number("evaluate.examples.n_test", nonneg=True, integer=True, fix="; 0 shows no examples")
    centering = _get(cfg, "evaluate.centering")
    if centering is not None and (not isinstance(centering, ListConfig) or not len(centering)
                                  or not all(isinstance(c, bool) for c in centering)):
        problems.append(f"evaluate.centering={centering!r} must be a non-empty list of booleans, e.g. [true,false]")
    problems += _shard_problems(cfg)
    return problems


def _shard_problems(cfg: DictConfig) -> list[str]:
    """Sharding of the gold standard over seeds and left-out instances (see README,
    'Scale-out and fault tolerance'). Only checked when the settings exist."""
    problems = []
    ft = cfg.get("further_training")
    if ft is None:
        return problems
    shard_seeds = ft.get("shard_seeds")
    if shard_seeds is not None:
        if not isinstance(shard_seeds, ListConfig) or not all(isinstance(s, int) and not isinstance(s, bool) for s in shard_seeds):
            problems.append(f"further_training.shard_seeds={shard_seeds!r} must be a list of seeds, e.g. [0,1]")
        else:
            try:
                valid = set(range(int(ft.seed_offset), int(ft.seed_offset) + int(ft.n_seeds)))
            except (TypeError, ValueError):
                valid = None
            outside = sorted(set(shard_seeds) - valid) if valid is not None else []
            if outside:
                problems.append(f"further_training.shard_seeds contains {outside}, outside the seeds "
                                f"{ft.seed_offset}..{int(ft.seed_offset) + int(ft.n_seeds) - 1} of this gold standard; "
                                f"raise further_training.n_seeds or drop them")
            if len(set(shard_seeds)) != len(shard_seeds):
                problems.append(f"further_training.shard_seeds={list(shard_seeds)} lists a seed twice")
            if not len(shard_seeds):
                problems.append("further_training.shard_seeds=[] computes nothing; use null for every seed")
    shard = ft.get("left_out_shard")
    if shard is not None:
        index, count = shard.get("index"), shard.get("count")
        if not (isinstance(count, int) and not isinstance(count, bool) and count >= 1):
            problems.append(f"further_training.left_out_shard.count={count!r} must be a positive number of shards")
        elif not (isinstance(index, int) and not isinstance(index, bool) and 0 <= index < count):
            problems.append(f"further_training.left_out_shard.index={index!r} must be in 0..{count - 1} "
                            f"(left_out_shard.count={count})")
    return problems


# ------------------------------------------------------------------------------ data
def validate_data(cfg: DictConfig, n_train: int, n_test: int, data=None) -> None:
    """Checks that need the data: empty splits, selections larger than the data and, given the
    loaded `data` (a DataBundle), NaN/inf inputs or targets, class labels outside the classes
    and a model that cannot take these inputs (a CNN on tabular data)."""
    name = _get(cfg, "dataset.name", "the dataset")
    problems = []
    if data is not None:
        values = data.value_problems()
        if values:
            problems.append(f"dataset {name} holds values no model can be trained on:\n      "
                            + "\n      ".join(values) + "\n    Clean the data (drop or impute the missing values, fix "
                            "the labels) or check the data file its loader reads (dataset.root / TDA_DATA_DIR)")
        problems += _model_fit_problems(cfg, data)
    if n_train == 0:
        problems.append(f"dataset {name} has no training rows; check the data file it reads (empty?) and "
                        f"dataset.max_train")
    if n_test == 0:
        problems.append(f"dataset {name} has no test rows; check the data file it reads (empty?), "
                        f"dataset.test_size and dataset.max_test")
    n_left_out = _get(cfg, "selection.n_left_out")
    if isinstance(n_left_out, int) and n_train and n_left_out > n_train:
        problems.append(f"selection.n_left_out={n_left_out} asks for more left-out instances than the {n_train} "
                        f"training rows of {name}; lower it (or set it to null for all rows) or raise dataset.max_train")
    n_sel_test = _get(cfg, "selection.n_test")
    if isinstance(n_sel_test, int) and n_test and n_sel_test > n_test:
        problems.append(f"selection.n_test={n_sel_test} asks for more test instances than the {n_test} test rows of "
                        f"{name}; lower it (or set it to null) or raise dataset.max_test")
    count = _get(cfg, "further_training.left_out_shard.count")
    n_lo = n_left_out if isinstance(n_left_out, int) else n_train
    if isinstance(count, int) and n_lo and count > n_lo:
        problems.append(f"further_training.left_out_shard.count={count} splits the {n_lo} left-out instances into more "
                        f"shards than there are instances; use at most {n_lo} shards")
    if problems:
        raise ConfigError("the configuration does not fit the data:\n  - " + "\n  - ".join(problems))


def _model_fit_problems(cfg: DictConfig, data) -> list[str]:
    """The model's declared inputs (TDAModel.modalities / input_dims) against the data's."""
    target = _get(cfg, "model._target_")
    cls = _import_target(str(target)) if target else None
    modalities, dims = getattr(cls, "modalities", None), getattr(cls, "input_dims", None)
    if modalities is None:
        return []
    model = _get(cfg, "model.name", target)
    shape = list(data.input_shape) if len(data.train) else None
    kinds = {"image": "image inputs [C, H, W]", "text": "token ids [L]", "tabular": "feature vectors"}
    if data.modality not in modalities or (dims is not None and shape is not None and len(shape) != dims):
        options = {"image": "model=small_cnn or model=resnet9", "text": "model=text_classifier",
                   "tabular": "model=mlp"}
        return [f"model={model} needs {' or '.join(kinds[m] for m in modalities)}, but dataset "
                f"{_get(cfg, 'dataset.name', 'the dataset')} is {data.modality} data with inputs of shape {shape}; "
                f"use {options.get(data.modality, 'another model')} for it, or a {'/'.join(modalities)} dataset"]
    return []


def validate_devices(cfg: DictConfig, attribution: bool = False) -> None:
    """The devices the config asks for exist on this machine: `trainer.accelerator` (final
    and further training) and, with `attribution`, `trainer.attribution_device` (the
    methods). Cheap; called before any data is loaded."""
    import torch

    problems = []
    accelerator = _get(cfg, "trainer.accelerator")
    if isinstance(accelerator, str) and accelerator.lower() in ("gpu", "cuda") and not torch.cuda.is_available():
        problems.append(f"trainer.accelerator={accelerator} asks for a CUDA GPU, but torch.cuda.is_available() is "
                        f"false on this machine (no GPU, or a CPU-only torch build); use trainer.accelerator=cpu "
                        f"(or auto), or run on a machine with a GPU")
    device = _get(cfg, "trainer.attribution_device") if attribution else None
    if device is not None:
        try:
            dev = torch.device(str(device))
        except (RuntimeError, ValueError):
            problems.append(f"trainer.attribution_device={device!r} is not a torch device; use cpu, cuda or cuda:<index>")
        else:
            if dev.type == "cuda" and not torch.cuda.is_available():
                problems.append(f"trainer.attribution_device={device} asks for a CUDA GPU, but torch.cuda.is_available() "
                                f"is false on this machine (no GPU, or a CPU-only torch build); use "
                                f"trainer.attribution_device=cpu, or run on a machine with a GPU")
            elif dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
                problems.append(f"trainer.attribution_device={device}: this machine has only "
                                f"{torch.cuda.device_count()} CUDA device(s); use cuda:0..cuda:{torch.cuda.device_count() - 1}")
            elif dev.type == "mps" and not torch.backends.mps.is_available():
                problems.append(f"trainer.attribution_device={device}: MPS is not available on this machine; use cpu")
    if problems:
        raise ConfigError("the configuration asks for devices this machine does not have:\n  - " + "\n  - ".join(problems))


_OFFLINE_MARKERS = ("offline", "couldn't reach", "could not reach", "connection", "max retries", "name resolution",
                    "failed to resolve", "temporary failure", "network is unreachable", "localentrynotfound",
                    "cannot find the requested files in the local cache", "urlopen error")


@contextlib.contextmanager
def data_errors(cfg: DictConfig) -> Iterator[None]:
    """Turn the usual dataset-loading failures into one message with the fix."""
    from tda.env import offline

    name = _get(cfg, "dataset.name", "the dataset")
    try:
        yield
    except ConfigError:
        raise
    except Exception as wrapped:
        # Hydra wraps the loader's own exception in an InstantiationException; report the
        # loader's exception itself, which names the problem without Hydra's preamble
        err = wrapped.__cause__ if type(wrapped).__name__ == "InstantiationException" and wrapped.__cause__ else wrapped
        text = f"{type(err).__name__}: {err}".lower()
        if "dataset.root" in text or "tda_data_dir" in text:
            raise err from None  # the loader already names the problem and the fix
        if type(err).__name__ == "EmptyDataError" or "no columns to parse" in text or "empty data file" in text:
            raise ConfigError(f"dataset {name}: a data file it reads is empty ({err}). Replace it with a complete copy "
                              f"(dataset.root=... or TDA_DATA_DIR) or delete it so that it is downloaded again") from err
        if "n_samples=0" in text or "0 sample(s)" in text:
            raise ConfigError(f"dataset {name}: its data has no rows (after its filters) ({err}). Check the data file it "
                              f"reads (dataset.root=... or TDA_DATA_DIR) and replace it with a complete copy") from None
        if offline() and any(m in text for m in _OFFLINE_MARKERS):
            raise ConfigError(f"dataset {name} needs a download, but offline mode is on "
                              f"(HF_DATASETS_OFFLINE / HF_HUB_OFFLINE / TDA_OFFLINE) and no local copy was found "
                              f"({type(err).__name__}: {err}). Either unset the offline variables to download it once, "
                              f"or point dataset.root (or $TDA_DATA_DIR/<dataset>) at a local copy") from err
        if any(m in text for m in _OFFLINE_MARKERS):
            raise ConfigError(f"dataset {name} could not be downloaded ({type(err).__name__}: {err}). Check the network "
                              f"connection, or point dataset.root (or $TDA_DATA_DIR/<dataset>) at a local copy") from err
        raise
