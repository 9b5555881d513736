"""Honest exits: SIGTERM (what schedulers send) and SIGINT (Ctrl+C) stop a stage with a non-zero
status and one message saying what was kept and how to resume.

Every artifact is written atomically and only once complete (final model, each gold-standard
seed or part, each method's scores, evaluation outputs as a set), so stopping at any point keeps
all completed work; the seed or scores in progress are simply not written. What must not happen
is a run that *looks* successful. Lightning gets in the way in two places (lightning 2.6):

- during `trainer.fit` its `_SignalConnector` chains a SIGTERM handler that only sets
  `trainer.received_sigterm`; the loops then raise `SIGTERMException`, a `SystemExit` with no
  code, i.e. exit status 0;
- `_call_and_handle_interrupt` catches `KeyboardInterrupt`, ignores SIGINT from then on and
  calls `sys.exit(1)`.

So the entry points run each stage under :func:`run_entry_point`: the first SIGTERM / SIGINT
raises :class:`Interrupted` in the main thread — a `BaseException` that is not a
`KeyboardInterrupt`, so no `except Exception` swallows it and Lightning re-raises it (its
SIGTERM handler calls ours, which it finds installed). `finally` blocks run (the stage's W&B run
is finished as failed, see tda.tracking.finish); then the message goes to stderr and the process
exits 128 + signal number (143 for SIGTERM, 130 for SIGINT, as shells report). A second signal
kills the process at once. Under a Hydra multirun the `SystemExit` ends the sweep. Whatever
ends a stage with an exception, W&B runs it left open are finished as failed.

User errors (tda.exits.is_user_error: a bad value, a missing final model, a refused artifact)
end the stage with their message on stderr, no traceback, and exit status 2, as Hydra does for
its own config errors; `HYDRA_FULL_ERROR=1` shows the traceback instead.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from hydra.errors import CompactHydraException, InstantiationException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from tda.exits import (
    HANDLED,
    USER_ERROR_EXIT,
    Interrupted,
    environment_problem,
    exit_code_of,
    is_lightning_sigterm,
    is_user_error,
)
from tda.tracking import finish_open_runs

FULL_ERROR = "HYDRA_FULL_ERROR"  # =1: tracebacks for user errors too


# Code a signal must not interrupt half-way: an exception raised inside W&B's client (e.g. in
# the middle of `run.log` sending a record to its service) breaks its connection, and the run
# could then not be finished as failed. The interruption is raised as soon as the main thread
# has left such code (re-checked every RETRY_S seconds with SIGALRM).
# tda.tracking too, so that a run W&B has just started is always registered for finishing.
PROTECTED_MODULES = ("wandb", "tda.tracking")
RETRY_S = 0.02


def _inside_protected(frame: Any) -> bool:
    while frame is not None:
        name = str(frame.f_globals.get("__name__", ""))
        if any(name == m or name.startswith(m + ".") for m in PROTECTED_MODULES):
            return True
        frame = frame.f_back
    return False


@contextmanager
def signals_raise() -> Iterator[None]:
    """Within the block, the first SIGTERM or SIGINT raises :class:`Interrupted` (once the main
    thread is outside W&B's client, see PROTECTED_MODULES); a second one gets the default
    action (the process dies at once). Outside the main thread (where Python cannot install
    handlers) the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (*HANDLED, signal.SIGALRM)}
    received: list[int] = []

    def raise_when_safe(frame: Any) -> None:
        if _inside_protected(frame):
            signal.setitimer(signal.ITIMER_REAL, RETRY_S)  # try again once it has returned
            return
        raise Interrupted(received[0])

    def on_signal(signum: int, frame: Any) -> None:
        if received:  # the second signal: no more cleanup, die now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        received.append(signum)
        raise_when_safe(frame)

    def on_alarm(signum: int, frame: Any) -> None:
        if received:
            raise_when_safe(frame)

    for s in HANDLED:
        signal.signal(s, on_signal)
    signal.signal(signal.SIGALRM, on_alarm)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def run_entry_point(stage: str, fn: Callable[[DictConfig], Any], cfg: DictConfig,
                    kept: Callable[[DictConfig, float], Kept]) -> Any:
    """Run `fn(cfg)` (the stage `stage`) as an entry point does: on SIGTERM / SIGINT print
    "interrupted by <signal> during <what>: <what was kept>; <how to resume>" (the stage's
    `kept(cfg, started)`, :class:`Kept`) to stderr and exit 128 + signal; on a user error print its
    message and exit 2 (:func:`exit_on_user_error`). Any other error propagates unchanged (Hydra
    prints its traceback, exit status 1)."""
    started = time.time()
    try:
        with signals_raise():
            return fn(cfg)
    except BaseException as err:  # interruptions and user errors are handled here, the rest re-raised
        code = exit_code_of(err)
        finish_open_runs(code)  # a W&B run the stage left open is recorded as failed, not finished
        exit_on_user_error(err)
        if not (isinstance(err, (Interrupted, KeyboardInterrupt)) or is_lightning_sigterm(err)):
            raise
        sig = signal.Signals(code - 128).name
    report_interruption(sig, describe(kept, stage, cfg, started))
    raise SystemExit(code)


def report_interruption(signal_name: str, kept: Kept) -> None:
    """The one message of an interrupted stage or sweep, on stderr: "interrupted by <signal>
    during <what>: <what was kept>; <how to resume>"."""
    print(f"interrupted by {signal_name} during {kept.doing}: {kept.kept}; {kept.resume}", file=sys.stderr, flush=True)


def full_error() -> bool:
    """Whether the user asked for tracebacks of every error (HYDRA_FULL_ERROR=1, as Hydra reads it)."""
    return os.environ.get(FULL_ERROR) == "1"


def exit_on_user_error(err: BaseException) -> None:
    """For a user error (tda.exits.is_user_error), unless HYDRA_FULL_ERROR is set: print its
    message, which names the problem and the fix, to stderr and exit 2. Otherwise return."""
    if not is_user_error(err) or full_error():
        return
    if isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__  # the constructor's own error, without Hydra's preamble
    text = environment_problem(err) or str(err)
    if isinstance(err, CompactHydraException) and isinstance(err.__cause__, OmegaConfBaseException):
        text += "\n" + str(err.__cause__)  # e.g. "Key 'epochz' is not in struct", as Hydra prints it
    print(f"Error: {text}", file=sys.stderr, flush=True)
    raise SystemExit(USER_ERROR_EXIT) from None


# ---------------------------------------------------------------------------------- what was kept
class Kept(NamedTuple):
    """What an interrupted stage leaves, as each stage says it (tda.stages.KEPT)."""

    doing: str  # what was running, e.g. "further training"
    kept: str  # what is on disk, e.g. "3 of 4 seeds are complete in ..."
    resume: str  # how to go on, e.g. "re-run the same command to resume"


def describe(kept: Callable[[DictConfig, float], Kept], stage: str, cfg: DictConfig, started: float = 0.0) -> Kept:
    """The interruption message's parts from the stage's `kept(cfg, started)`, read from the disk
    at the moment of the interruption (`started`: when the stage began, as time.time()); never
    raises."""
    try:
        return kept(cfg, started)
    except Exception as err:  # noqa: BLE001 - the message must come out whatever the config or the disk
        return Kept(stage, f"completed artifacts are kept (their state could not be read: {err})",
                    "re-run the same command to resume")


# ---------------------------------------------------------------------------------- sweeps
# A multirun's jobs may run in worker processes (hydra/launcher=joblib: loky workers;
# submitit_local: subprocesses). A signal to the launching process alone never reaches them, so
# the launcher stops them itself (tda.cli): the first SIGTERM / SIGINT raises Interrupted in it
# (:func:`signals_raise`), which makes joblib abort its pool; then every process it started that
# is still alive gets SIGTERM (a job in a worker then says what it kept, as a single run does)
# and, after STOP_GRACE_S, SIGKILL. Completed artifacts are whole either way (atomic writes).
STOP_GRACE_S = 3.0


def is_multirun(argv: list[str]) -> bool:
    """Whether a command line asks Hydra for a multirun (`-m`, `--multirun`, `hydra.mode=MULTIRUN`)."""
    return any(a in ("-m", "--multirun") or a.replace(" ", "") == "hydra.mode=MULTIRUN" for a in argv)


def sweep_interrupted(stage: str, err: Interrupted) -> SystemExit:
    """After a multirun of `stage` was interrupted in the launching process: stop its workers
    (:func:`stop_descendants`), say what was kept and how to resume, and return the SystemExit
    to raise (128 + signal)."""
    stop_descendants()
    report_interruption(err.signal_name, Kept(
        f"a multirun of the {stage} stage",
        "its worker processes were stopped; every artifact its jobs completed is kept (those in progress were not "
        "written)", "re-run the same command to resume"))
    return SystemExit(err.exit_code)


def stop_descendants(grace_s: float = STOP_GRACE_S) -> int:
    """SIGTERM to every live process this one started (directly or not), then SIGKILL to those
    still alive after `grace_s` seconds; returns how many were signalled. Resource trackers
    (multiprocessing's, loky's) are left alone: they compute nothing, ignore SIGTERM, and clean up
    and exit once this process has gone. Reads /proc (Linux); elsewhere nothing is found, and
    joblib's own abort is what stops its workers."""
    pids = [pid for pid in _descendants(os.getpid()) if b"resource_tracker" not in _cmdline(pid)]
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.05)
    for pid in pids:
        if _alive(pid):
            _signal(pid, signal.SIGKILL)
    return len(pids)


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state, ppid, ...), None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        fields = _stat(int(entry.name)) if entry.name.isdigit() else None
        if fields is not None and fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:  # reap it if it is our child (a zombie counts as gone)
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
