"""Small helpers around Hydra/OmegaConf: stable hashes of config nodes and instantiation.

Config nodes that describe a pluggable object carry `_target_` plus an optional `name` (used
for run-directory names, W&B tags and plot legends; it is not passed to the constructor).
"""

from __future__ import annotations

import hashlib
import json
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


def node_name(node: DictConfig | dict, default: str = "unnamed") -> str:
    name = node.get("name") if node is not None else None
    if name:
        return str(name)
    target = node.get("_target_", default) if node is not None else default
    return str(target).rsplit(".", 1)[-1].lower()
