"""What the influence methods compute once per final model and reuse: λ₀, the K-FAC / EK-FAC
factors and the Lanczos estimate of the curvature's extreme eigenvalues (LiSSA's definiteness
check). Each depends on the model, the training data and a few settings, not on the damping
multiple or the test instances, so a damping sweep, or several methods on one final model,
computes it once.

Entries live in the run's cache directory (`AttributionProblem.cache_dir`; none: nothing is
cached) and are checked by content, as the frozen part's features are: each records its
`source` — SHA-256 of the model's state (weights and buffers) and of the training tensors —
and the `settings` that define it, and is used only when both match the current problem; a
damaged or foreign entry is recomputed (with a warning) and replaced. Files are written
atomically with their checksum (JSON or safetensors, :mod:`tda.artifacts`); the file name
carries the entry's name (`lambda0`, `ekfac-factors`, `spectrum`) and a hash of its source and
settings, so entries for different settings sit side by side.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tda.artifacts import (
    IntegrityError,
    load_json,
    load_tensors_with_metadata,
    save_json,
    save_tensors,
    tensor_checksum,
)
from tda.provenance import ProvenanceError, require_match

log = logging.getLogger(__name__)


class CurvatureCache:
    """The cache entries of one model and training set (x [n, ...], y [n]) in `directory`."""

    def __init__(self, directory: Path | None, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        self.directory = None if directory is None else Path(directory)
        self._model, self._x, self._y = model, x, y

    @functools.cached_property
    def source(self) -> dict[str, str]:
        """What every entry is computed from, by content (hashed once per cache object)."""
        return {"weights": tensor_checksum(dict(self._model.state_dict())),
                "data": tensor_checksum({"x_train": self._x, "y_train": self._y})}

    def _path(self, name: str, settings: dict[str, Any], suffix: str) -> Path:
        key = json.dumps({"source": self.source, "settings": settings}, sort_keys=True)
        return self.directory / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}{suffix}"

    def _stamp(self, settings: dict[str, Any]) -> dict[str, Any]:
        return {"source": self.source, "settings": settings}

    def _check(self, found: dict[str, Any], settings: dict[str, Any], path: Path) -> None:
        require_match(found, self._stamp(settings), f"the cached {path.name}", "recomputing it")

    def get_json(self, name: str, settings: dict[str, Any]) -> dict[str, Any] | None:
        """The JSON entry `name` for `settings` if present and computed from this model, data
        and settings, else None."""
        path = None if self.directory is None else self._path(name, settings, ".json")
        if path is None or not path.is_file():
            return None
        try:
            entry = load_json(path)
            self._check(entry, settings, path)
            return entry["value"]
        except (IntegrityError, ProvenanceError, KeyError) as err:
            log.warning("%s", err)
            return None

    def json(self, name: str, settings: dict[str, Any], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The JSON entry `name` for `settings`: loaded if present and computed from this model,
        data and settings, else `compute()`d and stored."""
        value = self.get_json(name, settings)
        if value is None:
            value = compute()
            if self.directory is not None:
                save_json(self._path(name, settings, ".json"), {**self._stamp(settings), "value": value})
        return value

    def tensors(self, name: str, settings: dict[str, Any],
                compute: Callable[[], dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], Path | None, bool]:
        """(the tensor entry `name` for `settings`, its file or None, whether it was loaded):
        as :meth:`json`, for tensors (safetensors, loaded on the CPU)."""
        if self.directory is None:
            return compute(), None, False
        path = self._path(name, settings, ".safetensors")
        if path.is_file():
            try:
                tensors, meta, _ = load_tensors_with_metadata(path)
                self._check(meta, settings, path)
                return tensors, path, True
            except (IntegrityError, ProvenanceError) as err:
                log.warning("%s", err)
        tensors = compute()
        save_tensors(path, tensors, metadata=self._stamp(settings), what=f"the cached {name}")
        return tensors, path, False
