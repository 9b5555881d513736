"""Exit statuses: what an exception that ends a stage means for the process (0; 2 for a user
error; 128 + signal for an interruption; 1 for anything else, a bug). Shared by the W&B runs
(tda.tracking, which record it) and the entry points (tda.interrupt, which exit with it)."""

from __future__ import annotations

import errno
import os
import re
import signal
from pathlib import Path

from hydra.errors import CompactHydraException, InstantiationException

HANDLED = (signal.SIGTERM, signal.SIGINT)
USER_ERROR_EXIT = 2  # as Hydra users expect of a bad command line


class UserError(Exception):
    """A problem the user fixes (a bad value, a missing or refused artifact), not a bug: the
    entry points print its message, which names the problem and the fix, without a traceback
    and exit 2. ConfigError, IntegrityError and ProvenanceError are UserErrors."""


class RefusedError(UserError, ValueError):
    """A computation that would return a wrong number (an operator that is not positive
    definite, a recursion that diverges, a degenerate setting) and refuses instead; the message
    names the cause and the setting that fixes it."""


class DivergedError(UserError, FloatingPointError):
    """A run that left the finite, sane range: a training run's loss (too large a learning rate,
    no clipping; nothing of it was written), or an iterative solver's iterates (LiSSA's
    recursion at too small a scale)."""


def is_user_error(err: BaseException) -> bool:
    """A UserError, a missing file (every FileNotFoundError tda raises names the file and the
    fix), one of Hydra's own config errors (an unknown key, group option or override syntax) or
    an environment that refuses the work (:func:`environment_problem`); a constructor's failure
    that Hydra wraps counts only when its cause does."""
    if isinstance(err, InstantiationException):
        return err.__cause__ is not None and is_user_error(err.__cause__)
    if isinstance(err, (UserError, FileNotFoundError, CompactHydraException)):
        return True
    return environment_problem(err) is not None


# What the machine refused (errno of an OSError) -> the problem and the fix. Files are written
# atomically (a temporary file renamed into place), so what was complete stays complete.
_ENVIRONMENT = {
    errno.ENOSPC: "the disk is full writing {path}: free space, or point TDA_RUNS_DIR at a disk with room",
    errno.EDQUOT: "the disk quota is used up writing {path}: free space, or point TDA_RUNS_DIR at a disk with room",
    errno.EFBIG: "{path} would exceed the file-size limit (`ulimit -f`): raise it (`ulimit -f unlimited`) or "
                 "lower the sizes that make the file large",
    errno.EROFS: "{path} is on a read-only file system: point TDA_RUNS_DIR at a writable directory (a stage whose "
                 "work is complete reads a read-only run when its own files go elsewhere: hydra.run.dir=<writable "
                 "dir>, and logger.dir=<writable dir> or logger=none)",
    errno.EACCES: "permission denied for {path}: make it writable, or point TDA_RUNS_DIR at a writable directory",
    errno.EPERM: "permission denied for {path}: make it writable, or point TDA_RUNS_DIR at a writable directory",
    errno.EISDIR: "{path} is a directory where tda writes a file: remove or rename it",
    errno.ENOTDIR: "a part of {path} is a file where tda needs a directory: remove or rename it, or point "
                   "TDA_RUNS_DIR elsewhere",
    errno.EEXIST: "{path} exists and is not a directory where tda needs one: remove or rename it, or point "
                  "TDA_RUNS_DIR elsewhere",
}


def environment_problem(err: BaseException) -> str | None:
    """One line for an error of the environment rather than of tda (a full disk, a file-size
    limit, a read-only or wrong-kind path, memory exhausted), naming the problem and the fix;
    None for anything else. Completed artifacts are kept, so a re-run after the fix resumes."""
    if isinstance(err, MemoryError):
        return ("out of memory: the job needs more memory than this machine has free; lower "
                "attribution.memory_budget_mb or the sizes of the config (method.chunk_size, method.proj_dim, "
                "further_training.n_seeds, the selection), or free memory; completed work is kept, re-run to resume")
    if not isinstance(err, OSError):
        return None
    code, path, reason = err.errno, err.filename or "a file", err.strerror
    template = _ENVIRONMENT.get(code)
    if template is None:
        return None
    return template.format(path=path) + f" ({reason}); completed work is kept, re-run the command after the fix"


def unwritable_directory(path: str | Path) -> str | None:
    """Why tda could not create files in the directory `path` (or create it: its nearest existing
    ancestor is what counts), e.g. "on a read-only file system" or "a file, not a directory"; None
    when it can. Checked before work whose outputs must land there, so that nothing is computed in
    vain (and no library falls back silently to another place)."""
    path = Path(os.path.abspath(Path(path).expanduser()))
    existing = next(p for p in (path, *path.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        return f"{existing} is a file, not a directory" if existing == path else \
            f"{existing}, a part of it, is a file, not a directory"
    if os.access(existing, os.W_OK | os.X_OK):
        return None
    try:
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    where = "" if existing == path else f" ({existing}, where it would be created)"
    return f"it is on a read-only file system{where}" if read_only else f"permission is denied to write in it{where}"


# the fix for outputs that cannot be written into a run directory
WRITABLE_RUNS_FIX = "point TDA_RUNS_DIR at a writable directory (a copy of the run), or make it writable"


def require_writable_directory(path: str | Path, doing: str, fix: str) -> None:
    """Refuse, in one line naming `path` and `fix`, work whose outputs go into `path` where they
    cannot be written (:func:`unwritable_directory`); `doing`: e.g. "train writes the final model"."""
    why = unwritable_directory(path)
    if why:
        raise UserError(f"{doing} into {path}, but {why}: {fix}")


def os_error_of(err: Exception, path: object) -> OSError | None:
    """The OSError a library written in Rust (safetensors) reports only in its message, "... File
    too large (os error 27)", as an OSError naming `path`; None if the message holds none."""
    found = re.search(r"([^:]+) \(os error (\d+)\)", str(err))
    return OSError(int(found.group(2)), found.group(1).strip(), str(path)) if found else None


class Interrupted(BaseException):
    """The first SIGTERM / SIGINT received while a stage runs (see the module docstring)."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        super().__init__(f"interrupted by {self.signal_name}")

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def exit_code_of(err: BaseException | None) -> int:
    """The process exit status an exception leads to: 0 for none (or a clean SystemExit),
    128 + signal for an interruption (Lightning's SIGTERMException included), 2 for a user
    error (:func:`is_user_error`), 1 otherwise."""
    if err is None:
        return 0
    if isinstance(err, Interrupted):
        return err.exit_code
    if is_lightning_sigterm(err):
        return 128 + signal.SIGTERM
    if isinstance(err, KeyboardInterrupt):
        return 128 + signal.SIGINT
    if isinstance(err, SystemExit):
        return err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
    if is_user_error(err):
        return USER_ERROR_EXIT
    return 1


def is_lightning_sigterm(err: BaseException) -> bool:
    try:
        from lightning.pytorch.utilities.exceptions import SIGTERMException  # noqa: PLC0415 - tda.config imports exits: no lightning there
    except ImportError:  # pragma: no cover - lightning is a dependency
        return False
    return isinstance(err, SIGTERMException)
