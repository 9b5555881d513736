"""What produced an artifact, and refusing to combine artifacts that do not belong together.

Every artifact a stage writes carries a provenance record (in a safetensors header or a JSON
file): the code version, the hash and content of the config nodes that determine it, and the
shapes / index lists it was computed for. Before a stage combines artifacts (a final model
with the current config, cached method scores with the current selection, method scores
with the gold standard) it compares these records with :func:`require_match`, which names
every field that differs and says what to do about it.
"""

from __future__ import annotations

import functools
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tda.config import config_hash, to_container

REPO_ROOT = Path(__file__).resolve().parents[1]


class ProvenanceError(ValueError):
    """Artifacts that were produced for different configurations or instances."""


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """The git commit of the working tree (and whether it has uncommitted changes) if the
    code lives in a git checkout, else the installed package version."""
    out: dict[str, Any] = {}
    try:
        from importlib.metadata import version

        out["package_version"] = version("tda")
    except Exception:  # not installed as a distribution (e.g. run from a source tree)
        out["package_version"] = None
    try:
        commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        out["git_commit"], out["git_dirty"] = commit, bool(dirty)
    except Exception:  # no git binary, or not a checkout: the package version is all we have
        out["git_commit"], out["git_dirty"] = None, None
    return out


def stamp(stage: str, config: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A provenance record: `config` maps config-node names to nodes (resolved here); `extra`
    holds shapes, index lists, fingerprints."""
    resolved = {k: to_container(v) for k, v in config.items()}
    return {"stage": stage, "code_version": code_version(), "created": datetime.now(timezone.utc).isoformat(),
            "config_hash": config_hash(*(resolved[k] for k in sorted(resolved))), "config": resolved, **extra}


def require_match(found: dict[str, Any], expected: dict[str, Any], what: str, fix: str) -> None:
    """Raise :class:`ProvenanceError` naming every key whose value in `found` (read from an
    artifact) differs from `expected` (what the current stage needs). Keys missing from
    `found` (artifacts written before a field existed) are not held against it."""
    diffs = []
    for key, want in expected.items():
        if key not in found:
            continue
        have = to_container(found[key])
        want = to_container(want)
        if have != want:
            diffs.append(f"{key}: artifact has {_short(have)}, this run needs {_short(want)}")
    if diffs:
        raise ProvenanceError(f"refusing to combine {what}, which was produced for a different configuration or "
                              f"different instances:\n  - " + "\n  - ".join(diffs) + f"\n{fix}")


def _short(value: Any, limit: int = 160) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
