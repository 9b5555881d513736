"""Atomic, pickle-free artifact I/O: tensors through safetensors, metadata through JSON.

Every writer goes through a temporary file in the same directory followed by `os.replace`,
so a killed process leaves either the old file or the new one, never a partial file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def _atomic_target(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)


def _replace(tmp: str, path: Path) -> None:
    os.replace(tmp, path)
    # make the rename itself durable, so a completed artifact survives a crash
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextmanager
def _atomic_file(path: str | Path) -> Iterator[str]:
    """Yield a temporary file next to `path` for the caller to fill; then fsync it and rename it
    over `path`. On any error (or interruption) the temporary file is removed instead."""
    path = Path(path)
    fd, tmp = _atomic_target(path)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        _replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> None:
    """Write `tensors` atomically; `metadata` (JSON-serialisable) is stored in the header."""
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    header = {"json": json.dumps(metadata, sort_keys=True)} if metadata is not None else None
    with _atomic_file(path) as tmp:
        save_file(contiguous, tmp, metadata=header)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing artifact {path}")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"corrupt artifact {path} ({err}); delete it and re-run the stage that wrote it") from err


def load_tensor_metadata(path: str | Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    return json.loads(header["json"]) if "json" in header else {}


def save_json(path: str | Path, obj: Any) -> None:
    save_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def load_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing artifact {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"corrupt JSON artifact {path} ({err}); delete it and re-run the stage that wrote it") from err


def save_text(path: str | Path, text: str) -> None:
    with _atomic_file(path) as tmp:
        Path(tmp).write_text(text)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")
