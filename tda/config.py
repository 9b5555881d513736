"""Small helpers around Hydra/OmegaConf: stable hashes of config nodes and instantiation.

Config nodes that describe a pluggable object carry `_target_` plus an optional `name` (used
for run-directory names, W&B tags and plot legends; it is not passed to the constructor).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf


def to_container(cfg: Any) -> Any:
    """Resolved plain-Python copy of a config node (never `${...}` strings)."""
    if isinstance(cfg, DictConfig) or OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def config_hash(*nodes: Any, length: int = 8) -> str:
    """Deterministic short hash of resolved config nodes (key order does not matter)."""
    payload = json.dumps([to_container(n) for n in nodes], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:length]


def build(node: DictConfig | dict, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate` without the descriptive `name` key."""
    plain = dict(to_container(node))
    plain.pop("name", None)
    return instantiate(plain, **kwargs)


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
        from tda.validation import ConfigError  # lazy: tda.validation imports this module

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
        own = node._key() if isinstance(node, DictConfig) else None
        key = str(own) if own is not None else "the node"
    name = node.get("name") if node is not None else None
    if name is not None:
        return safe_name(name, f"{key}.name")
    target = node.get("_target_", default) if node is not None else default
    return safe_name(str(target).rsplit(".", 1)[-1].lower(), f"{key}._target_ (no {key}.name)", f"{key}.name")
