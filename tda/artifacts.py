"""Atomic, pickle-free, verified artifact I/O: tensors through safetensors, metadata through JSON.

Writes. Every writer fills a temporary file in the target's directory, fsyncs it and renames
it over the target, so a killed process leaves either the old file or the new one, never a
partial file. Files get the mode the process umask gives (not `mkstemp`'s 0600). Temporary
files left by a killed writer are removed by :func:`remove_stale_temp_files`.

Integrity. A tensor file carries the SHA-256 of its tensors (names, dtypes, shapes and bytes)
in its header, and a JSON artifact carries the SHA-256 of its canonical content under
`"_sha256"`. Loading verifies it and raises :class:`IntegrityError` naming the file and the fix
on any mismatch (a flipped bit, a truncated or hand-edited file) or when the checksum is
missing (an artifact this version did not write). Non-finite floating-point values are
refused at write time (:class:`NonFiniteError`), so no artifact can hold a NaN or inf.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from tda.exits import UserError, os_error_of

CHECKSUM_KEY = "_sha256"  # in a JSON artifact's top-level object
_HEADER_CHECKSUM = "sha256"  # in a safetensors header's metadata
_HOST = socket.gethostname().replace(".", "_")


class IntegrityError(UserError, ValueError):
    """An artifact whose content does not match its checksum (damaged, truncated, edited), or
    that carries none."""


class NonFiniteError(FloatingPointError):
    """A tensor about to be written holds NaN or inf."""


# ------------------------------------------------------------------------------ writing
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_target(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    # host and pid in the name let a later run tell a dead writer's leftovers from a live one's
    return tempfile.mkstemp(prefix=f".{path.name}.{_HOST}-{os.getpid()}.", suffix=".tmp", dir=path.parent)


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
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        _replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.errno is not None and err.filename is None:  # e.g. a full disk
            raise OSError(err.errno, err.strerror, str(path)) from err  # the message names the artifact
        raise


_UNWRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def remove_stale_temp_files(root: str | Path, max_age_s: float = 24 * 3600) -> list[Path]:
    """Delete the temporary files of killed writers under `root` (recursively): those of this
    host whose process is gone, and any older than `max_age_s` (another host's, on a shared
    file system). A live writer's file is never touched. Returns what was removed."""
    root = Path(root)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    now = time.time()
    for p in root.rglob(".*.tmp"):
        parts = p.name.rsplit(".", 3)  # ['.<name>', '<host>-<pid>', '<random>', 'tmp']
        host, _, pid = parts[1].rpartition("-") if len(parts) == 4 else ("", "", "")
        try:
            if host == _HOST and pid.isdigit():
                stale = not _alive(int(pid))
            else:
                stale = now - p.stat().st_mtime > max_age_s
            if stale:
                p.unlink()
                removed.append(p)
        except FileNotFoundError:  # its writer finished meanwhile
            continue
        except OSError as err:  # read-only storage: a leftover is harmless (never read), so leave it
            if err.errno not in _UNWRITABLE:
                raise
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------------------ tensors
def tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors' names, dtypes, shapes and bytes (in name order)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")  # the buffer itself, no copy
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (an input file a run was computed from, e.g. an index file)."""
    h = hashlib.sha256()
    with open(Path(path).expanduser(), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def require_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Raise :class:`NonFiniteError` naming every floating-point tensor with NaN / inf."""
    bad = []
    for name, t in tensors.items():
        if t.is_floating_point() or t.is_complex():
            n = int((~torch.isfinite(t)).sum())
            if n:
                bad.append(f"{name} ({n} of {t.numel()} values)")
    if bad:
        raise NonFiniteError(f"refusing to write {what}: non-finite values (NaN/inf) in {', '.join(bad)}")


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None,
                 what: str | None = None) -> str:
    """Write `tensors` atomically with their checksum; `metadata` (JSON-serialisable) is stored
    in the header. Refuses NaN / inf. Returns the checksum."""
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    require_finite(contiguous, what or str(path))
    checksum = tensor_checksum(contiguous)
    header = {_HEADER_CHECKSUM: checksum}
    if metadata is not None:
        header["json"] = json.dumps(_plain(metadata), sort_keys=True)
    with _atomic_file(path) as tmp:
        try:
            save_file(contiguous, tmp, metadata=header)
        except SafetensorError as err:  # a full disk or a size limit, as the OSError it is
            raise (os_error_of(err, path) or err) from err
    return checksum


def _fix(path: Path) -> str:
    return "delete it and re-run the stage that wrote it"


def _header(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise FileNotFoundError(f"missing artifact {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise IntegrityError(f"corrupt artifact {path} ({err}); {_fix(path)}") from err


def load_tensors_with_metadata(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """(tensors, header metadata, checksum) of a file written by :func:`save_tensors`, after
    verifying the checksum."""
    path = Path(path)
    header = _header(path)
    if _HEADER_CHECKSUM not in header:
        raise IntegrityError(f"{path} carries no checksum (written by an older version of tda, or by another tool), "
                             f"so its content cannot be verified; {_fix(path)}")
    try:
        tensors = load_file(str(path))
    except Exception as err:
        raise IntegrityError(f"corrupt artifact {path} ({err}); {_fix(path)}") from err
    checksum = tensor_checksum(tensors)
    if checksum != header[_HEADER_CHECKSUM]:
        raise IntegrityError(f"{path} is damaged: its data does not match the checksum recorded when it was written "
                             f"(a changed byte or a partial copy); {_fix(path)}")
    meta = json.loads(header["json"]) if "json" in header else {}
    return tensors, meta, checksum


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a file written by :func:`save_tensors`, verified."""
    return load_tensors_with_metadata(path)[0]


def load_tensor_metadata(path: str | Path) -> dict[str, Any]:
    """The header metadata only (cheap, NOT verified: for display, never to decide reuse)."""
    header = _header(Path(path))
    return json.loads(header["json"]) if "json" in header else {}


# ------------------------------------------------------------------------------ JSON
def json_checksum(obj: Any) -> str:
    """SHA-256 of the canonical JSON of `obj` without its `_sha256` key."""
    plain = {k: v for k, v in obj.items() if k != CHECKSUM_KEY} if isinstance(obj, dict) else obj
    return hashlib.sha256(json.dumps(_plain(plain), sort_keys=True).encode()).hexdigest()


def save_json(path: str | Path, obj: Any) -> None:
    """Write a JSON artifact atomically; a dict gets its checksum under `_sha256`."""
    obj = _plain(obj)
    if isinstance(obj, dict):
        obj = {**obj, CHECKSUM_KEY: json_checksum(obj)}
    save_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def load_json(path: str | Path, verify: bool = True) -> Any:
    """A JSON artifact, its checksum verified (`verify=False` for files users write by hand)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing artifact {path}")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise IntegrityError(f"corrupt JSON artifact {path} ({err}); {_fix(path)}") from err
    if not verify:
        return obj
    if not isinstance(obj, dict) or CHECKSUM_KEY not in obj:
        raise IntegrityError(f"{path} carries no checksum (written by an older version of tda, or by hand), so its "
                             f"content cannot be verified; {_fix(path)}")
    if obj[CHECKSUM_KEY] != json_checksum(obj):
        raise IntegrityError(f"{path} was changed after it was written (its content does not match its checksum); "
                             f"restore it, or {_fix(path)}")
    return {k: v for k, v in obj.items() if k != CHECKSUM_KEY}


def save_text(path: str | Path, text: str) -> None:
    with _atomic_file(path) as tmp:
        Path(tmp).write_text(text)


def _plain(obj: Any) -> Any:
    """`obj` as plain JSON values (tensors to lists, paths to strings), so that a checksum
    computed before writing matches the one computed after reading."""
    return json.loads(json.dumps(obj, default=_json_default))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")
