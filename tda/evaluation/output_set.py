"""Outputs written as one set: a directory of files (an evaluation's CSVs, figures and report)
is filled in a staging directory beside its final place and swapped in only when every file is
complete, so the final directory never mixes two evaluations and never holds a truncated file.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

# A staging or set-aside directory left by a process on another host is only removed once it
# has not changed for this long (that process may still be writing to a shared file system).
FOREIGN_STALE_SECONDS = 6 * 3600


@contextmanager
def output_set(final: Path) -> Iterator[Path]:
    """Yield a fresh, empty staging directory beside `final` (`.<name>.staging-<host>-<pid>-<random>`)
    for the caller to write every output into; when the block completes, swap it in as `final`
    (the previous set is renamed aside, the new one renamed in, the old one removed).

    A killed or failing evaluate therefore leaves the previous complete set in `final`
    untouched, or none if there was none: never a mix of two evaluations, never a truncated
    file under its real name. (A kill in the instant between the two renames leaves `final`
    absent and the previous set aside; the next evaluate moves it back.) Leftovers of killed
    evaluates are cleaned up at the start (see `remove_stale_sets`); an error in the block
    removes its own staging directory.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_sets(final)
    tag = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    staging = final.parent / f".{final.name}.staging-{tag}"
    os.mkdir(staging)  # not tempfile.mkdtemp: the directory keeps the umask's permissions, not 0700
    try:
        yield staging
        _sync_tree(staging)
        _swap_in(staging, final, tag)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, OSError) and err.errno is not None and err.filename is None:  # a library's write
            raise OSError(err.errno, err.strerror, f"the evaluation's outputs for {final}") from err
        raise


def _sets_beside(final: Path, kind: str) -> list[tuple[Path, str, int]]:
    """The `kind` directories of `final` — "staging" (being written), "old" (a complete previous
    set, renamed aside during a swap) or "trash" (being deleted) — newest first, each with the
    host and pid of the process that made it."""
    prefix = f".{final.name}.{kind}-"
    found = []
    for d in final.parent.glob(f"{prefix}*"):
        host, _, pid = d.name[len(prefix):].rpartition("-")[0].rpartition("-")  # <host>-<pid>-<random>
        try:
            found.append((_mtime(d), d, host, int(pid)))
        except ValueError:
            continue  # not one of ours
    return [(d, host, pid) for _, d, host, pid in sorted(found, key=lambda t: t[0], reverse=True)]


def _mtime(d: Path) -> float:
    try:
        return d.stat().st_mtime
    except FileNotFoundError:  # removed meanwhile by another evaluate's clean-up
        return 0.0


def _abandoned(d: Path, host: str, pid: int) -> bool:
    """Whether the process that made `d` is gone: on this host, no live process with that pid
    (our own pid counts as gone: one process evaluates one set at a time); on another host,
    `d` unchanged for FOREIGN_STALE_SECONDS."""
    if host != socket.gethostname():
        return d.exists() and time.time() - _mtime(d) > FOREIGN_STALE_SECONDS
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def remove_stale_sets(final: Path) -> None:
    """Clean up after killed evaluates of `final`: remove their staging and trash directories;
    move the newest set-aside previous set back into place if `final` is missing (killed between
    the two renames of a swap), else remove it. Directories of evaluates still running are left
    alone."""
    for d, host, pid in _sets_beside(final, "old"):
        if not _abandoned(d, host, pid):
            continue
        if not final.exists():
            try:
                os.rename(d, final)
                log.warning("restored the previous evaluation outputs %s from %s (an evaluate was killed while "
                            "swapping them in)", final, d.name)
                continue
            except OSError:
                pass
        shutil.rmtree(d, ignore_errors=True)
    for kind in ("staging", "trash"):
        for d, host, pid in _sets_beside(final, kind):
            if _abandoned(d, host, pid):
                log.info("removing %s, left by an evaluate that did not finish", d)
                shutil.rmtree(d, ignore_errors=True)


def _sync_tree(d: Path) -> None:
    """fsync every file in `d` and `d` itself, so the set is on disk before it is renamed in."""
    for p in d.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(d)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap_in(staging: Path, final: Path, tag: str) -> None:
    """Rename `staging` to `final`, moving a set already there aside first and removing it
    after. Another evaluate of the same outputs may put its set in place between our two
    renames: then that one is moved aside too and we retry (the last one to finish wins)."""
    asides: list[Path] = []
    for attempt in range(20):
        aside = final.parent / f".{final.name}.old-{tag}{attempt:02d}"  # same <host>-<pid>-<random> form
        try:
            os.rename(final, aside)
            asides.append(aside)
        except FileNotFoundError:
            pass  # no previous set (or another evaluate just moved it)
        try:
            os.rename(staging, final)
            break
        except OSError as err:
            if err.errno in (errno.ENOTEMPTY, errno.EEXIST) and final.exists():
                continue  # a concurrent evaluate's complete set arrived in between: move it aside too
            if not final.exists() and asides:
                os.rename(asides.pop(), final)  # put the previous set back before giving up
            raise
    else:
        raise RuntimeError(f"could not move the evaluation outputs into {final}: other evaluates of the same "
                           f"outputs kept replacing them; run one evaluate at a time")
    _fsync_dir(final.parent)
    for aside in asides:
        # renamed first, so that an "old" directory is always a complete set (a kill during the
        # deletion leaves a "trash" directory, which the next evaluate removes, never restores)
        trash = aside.with_name(f".{final.name}.trash-{aside.name[len(f'.{final.name}.old-'):]}")
        os.rename(aside, trash)
        shutil.rmtree(trash, ignore_errors=True)
