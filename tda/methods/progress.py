"""Progress lines for the long loops of the methods (solver iterations, factor passes,
projection chunks): a method that runs for minutes says where it is, one log line per block
of work, while a small problem that finishes in seconds stays silent.
"""

from __future__ import annotations

import time

# seconds between two progress lines of one loop; the first comes after as long
EVERY_SECONDS = 10.0


class Progress:
    """`due()` is true at most once per :data:`EVERY_SECONDS` since the loop started, so a loop
    calls it once per block of work and logs its state only then (cheap when not due: no
    synchronising read of a device tensor is needed)."""

    def __init__(self, every_seconds: float | None = None):
        self.every = EVERY_SECONDS if every_seconds is None else every_seconds
        self.last = time.monotonic()

    def due(self) -> bool:
        now = time.monotonic()
        if now - self.last < self.every:
            return False
        self.last = now
        return True
