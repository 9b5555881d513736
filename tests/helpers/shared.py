"""What the pytest workers share (the README's test command runs two or more with pytest-xdist):
folders built once per test session, whichever worker asks first, and read by all.

Each worker has its own temporary base folder (`tmp_path_factory.getbasetemp()`, inside the
session's); the session's folder above it is common to every worker of one run and to no other
run, so a folder built there under a file lock is built once and seen complete by everyone."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock


def worker_count() -> int:
    """How many pytest workers run this session (1 without xdist)."""
    return int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))


def session_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's temporary folder, common to all its workers."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if "PYTEST_XDIST_WORKER" in os.environ else base


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """`<session root>/<name>`, built by `build(folder)` by the first worker that asks; the others
    wait for it. A build that failed (no `<name>.done` beside it) is redone by the next caller,
    so the error shows in every test that needs it. Treat the folder as read-only: copy it."""
    folder = session_root(tmp_path_factory) / name
    done = folder.with_name(f"{name}.done")
    with FileLock(str(folder.with_name(f"{name}.lock"))):
        if not done.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            build(folder)
            done.write_text("")
    return folder
