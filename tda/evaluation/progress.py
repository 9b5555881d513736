"""Progress of an evaluation, which runs for seconds to minutes (the seed windows recompute the
gold standard once per window): one log line as each step starts, so a working evaluate can
be told from a hung one, and the wall time of every step in the closing line."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("tda.evaluation")


class Steps:
    """The steps of one flow (`evaluate`, `compare`), timed."""

    def __init__(self, flow: str):
        self.flow = flow
        self.seconds: dict[str, float] = {}

    @contextmanager
    def step(self, name: str, detail: str = "") -> Iterator[None]:
        """Log `<flow>: <name> (<detail>)` now and time the block."""
        log.info("%s: %s%s", self.flow, name, f" ({detail})" if detail else "")
        t0 = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def timings(self) -> str:
        """`4.1 s (loading 0.2 s, similarity curves 1.2 s, ...)`."""
        return (f"{sum(self.seconds.values()):.1f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())
                + ")")
