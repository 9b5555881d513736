"""What a further-training job shows while it runs: one progress bar over its seeds and groups
of runs ("seed 3/40 · group 2/5"), and none of Lightning's per-`fit` output (the GPU / TPU
banner, the litlogger tip, "`Trainer.fit` stopped", known warnings), which would otherwise
repeat once per group of runs (33 times for the CIFAR-10 gold standard). Final training keeps
Lightning's own bar and messages.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

# Lightning's loggers: their INFO records are the banners, tips and "`Trainer.fit` stopped"
LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")
# Warnings each group's `fit` would raise, none of which concerns further training: it feeds
# its own batches (no DataLoader workers, no optimizer from configure_optimizers), runs on one
# device, and Lightning's own use of a deprecated torch API.
LIGHTNING_NOISE = ".*(configure_optimizers|num_workers|does not have many workers|GPU available|TPU available" \
                  "|LOCAL_RANK|isinstance\\(treespec, LeafSpec\\)).*"


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Within the block, Lightning logs only warnings and errors, and LIGHTNING_NOISE is ignored."""
    loggers = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=LIGHTNING_NOISE)
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


class GoldProgress:
    """One bar over a job's seeds, `groups_per_seed` steps each (the groups of runs trained
    together; for the reference engine, single runs: `unit="run"`). A seed found on disk
    counts as done at once. Use as a context manager; log lines print above the bar."""

    def __init__(self, seeds: list[int], groups_per_seed: int, unit: str = "group", enabled: bool = True):
        self.position = {s: i + 1 for i, s in enumerate(seeds)}
        self.groups, self.unit, self.enabled = groups_per_seed, unit, enabled
        self.counted = dict.fromkeys(seeds, 0)
        self.bar: tqdm | None = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> GoldProgress:
        if self.enabled:
            self._stack.enter_context(logging_redirect_tqdm())
        self.bar = self._stack.enter_context(tqdm(total=len(self.position) * self.groups, unit=self.unit,
                                                  disable=not self.enabled, dynamic_ncols=True))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def start(self, seed: int, group: int) -> None:
        """Group `group` (from 0) of `seed` starts training."""
        self.bar.set_description_str(f"seed {self.position[seed]}/{len(self.position)} · "
                                     f"{self.unit} {group + 1}/{self.groups}")

    def advance(self, seed: int) -> None:
        """One group of `seed` has finished."""
        self.counted[seed] += 1
        self.bar.update(1)

    def seed_done(self, seed: int) -> None:
        """`seed` is complete (written now, or found on disk): count what is left of it."""
        self.bar.update(self.groups - self.counted[seed])
        self.counted[seed] = self.groups
