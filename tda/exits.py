"""Exit statuses: what an exception that ends a stage means for the process (0; 2 for a user
error; 128 + signal for an interruption; 1 for anything else, a bug). Shared by the W&B runs
(tda.tracking, which record it) and the entry points (tda.interrupt, which exit with it)."""

from __future__ import annotations

import signal

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
    """A training run whose loss left the finite, sane range (too large a learning rate, no
    clipping); nothing of it was written."""


def is_user_error(err: BaseException) -> bool:
    """A UserError, a missing file (every FileNotFoundError tda raises names the file and the
    fix) or one of Hydra's own config errors (an unknown key, group option or override syntax);
    a constructor's failure that Hydra wraps counts only when its cause does."""
    if isinstance(err, InstantiationException):
        return err.__cause__ is not None and is_user_error(err.__cause__)
    return isinstance(err, (UserError, FileNotFoundError, CompactHydraException))


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
