"""The entry points as real processes, for the tests that kill them: start one with its output
appended to a log, wait for it to succeed, SIGKILL it (no cleanup handlers run), poll for a moment.
Every delay before a kill is drawn from RNG, unseeded on purpose (a different moment every run),
and printed by the test, so a failure can be replayed."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers.config import ROOT

RNG = random.Random()  # unseeded on purpose: a different moment every run; printed for replay


def start_logged(script: str, overrides: list[str], log: Path) -> subprocess.Popen:
    """`python <script> <overrides>` in the repository root, stdout and stderr appended to `log`."""
    f = open(log, "ab")
    return subprocess.Popen([sys.executable, script, *overrides], cwd=ROOT, env=dict(os.environ), stdout=f, stderr=f)


def finish_logged(proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    rc = proc.wait(timeout=timeout)
    assert rc == 0, f"{proc.args} failed (rc={rc}):\n{log.read_text()[-4000:]}"


def sigkill(proc: subprocess.Popen) -> bool:
    """SIGKILL (no cleanup handlers run); True if the process was still running."""
    alive = proc.poll() is None
    if alive:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return alive


def poll_until(pred, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Return once `pred()` holds, the process has ended, or `timeout` seconds have passed."""
    t0 = time.monotonic()
    while not pred():
        if proc.poll() is not None or time.monotonic() - t0 > timeout:
            return
        time.sleep(0.02)
