"""The stacked further-training engine: all runs of a seed (or a group of them) at once.

Same semantics as :mod:`tda.further_training.reference` (one model, one torch.optim
optimizer, PyTorch samplers), computed for R runs together:

- :func:`plan_step` turns the seed's epoch permutation into each run's batch for one step
  of the full run's clock: rows `idx` [r, M] and loss weights `w` [r, M], in at most two
  groups of equal batch length (a `drop` run's last batch is one row shorter; its epoch may
  even be one batch shorter, and then it sits out that step).
- :class:`StackedRuns` holds a :class:`~tda.further_training.stacked.StackedModel` and a
  :class:`~tda.further_training.optim.StackedOptimizer` and steps every run at once; its
  :class:`GroupTrainer` plans the leave-one-out runs' batches with :func:`plan_step` and records
  every run's test losses (and the full-data run's distance from the start) at each checkpoint
  (the subset runs: tda.further_training.subsets).
- :class:`FurtherTrainingModule` drives a StackedRuns from a Lightning Trainer (progress
  bar, device and precision flags, loggers); one `fit` per group of runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import torch
from torch.utils.data import DataLoader

from tda.further_training.checkpoints import checkpoint_steps, distance_from_start, steps_per_epoch
from tda.further_training.optim import StackedOptimizer, clip_grad_norm_per_run
from tda.further_training.reference import step_seed
from tda.further_training.stacked import StackedModel


@dataclass
class StepGroup:
    """Runs that share a batch length in one step. rows [r] (positions in the group of
    runs), idx [r, M] training rows, w [r, M] loss weights."""

    rows: torch.Tensor
    idx: torch.Tensor
    w: torch.Tensor


def plan_step(perm: torch.Tensor, pos: torch.Tensor, left_out: torch.Tensor, is_full: torch.Tensor, b: int,
              batch_size: int, removal: str, eps: float, dtype: torch.dtype) -> tuple[list[StepGroup], torch.Tensor]:
    """Each run's batch in step b of an epoch.

    perm [n]: the epoch's permutation; left_out [R] training index of each run's left-out
    instance (ignored where is_full [R] is true); pos [R]: its position in perm.
    Returns the groups and active [R] (false: the run has no batch in this step)."""
    n, R = len(perm), len(left_out)
    B = batch_size
    start = b * B
    L_full = min(start + B, n) - start
    groups: list[StepGroup] = []
    active = torch.ones(R, dtype=torch.bool)
    if removal == "drop":
        L_lo = max(min(start + B, n - 1) - start, 0)
        q = torch.arange(start, start + L_full)
        full_rows = is_full.nonzero().squeeze(1)
        lo_rows = (~is_full).nonzero().squeeze(1)
        if L_lo == L_full:
            shift = (q.unsqueeze(0) >= pos.unsqueeze(1)) & ~is_full.unsqueeze(1)  # [R, L]
            idx = perm[q.unsqueeze(0) + shift.long()]
            groups.append(StepGroup(torch.arange(R), idx, torch.full(idx.shape, 1.0 / L_full, dtype=dtype)))
            return groups, active
        if len(full_rows):
            idx = perm[q].unsqueeze(0).expand(len(full_rows), -1)
            groups.append(StepGroup(full_rows, idx, torch.full(idx.shape, 1.0 / L_full, dtype=dtype)))
        if len(lo_rows):
            if L_lo == 0:
                active[lo_rows] = False
            else:
                ql = q[:L_lo]
                idx = perm[ql.unsqueeze(0) + (ql.unsqueeze(0) >= pos[lo_rows].unsqueeze(1)).long()]
                groups.append(StepGroup(lo_rows, idx, torch.full(idx.shape, 1.0 / L_lo, dtype=dtype)))
        return groups, active
    batch = perm[start:start + L_full]
    idx = batch.unsqueeze(0).expand(R, -1)
    w = torch.full((R, L_full), 1.0 / L_full, dtype=dtype)
    if removal == "mask":
        hit = (idx == left_out.unsqueeze(1)) & ~is_full.unsqueeze(1)  # [R, L]
        has = hit.any(1)
        if bool(has.any()):
            w[has] = (~hit[has]).to(dtype) / max(L_full - 1, 1)
    elif removal == "downweight":
        extra = torch.where(is_full, batch[0], left_out).unsqueeze(1)
        idx = torch.cat([idx, extra], dim=1)
        extra_w = torch.where(is_full, torch.zeros((), dtype=dtype), torch.tensor(-eps, dtype=dtype)).unsqueeze(1)
        w = torch.cat([w, extra_w], dim=1)
    else:
        raise ValueError(f"unknown removal mode {removal!r}; expected drop | downweight | mask")
    groups.append(StepGroup(torch.arange(R), idx, w))
    return groups, active


class StackedRuns:
    """R runs of one seed trained together, one step of every run at a time: subclasses say which
    rows (and loss weights) each run's batch holds in step b of an epoch (:meth:`plan`). At each
    checkpoint (tda.further_training.checkpoints.checkpoint_steps of the checkpoint_* arguments;
    `checkpoint_steps`) :meth:`record` measures every run's test instances.

    `n_rows`: the rows of one epoch (an epoch has ⌈n_rows / batch_size⌉ steps); `epochs`: how many."""

    def __init__(self, stacked: StackedModel, opt_kind: str, opt_hp: dict, n_rows: int, epochs: int, batch_size: int,
                 seed: int, x_test: torch.Tensor, y_test: torch.Tensor, clip_grad_norm: float | None = None,
                 checkpoint_every: int | None = None, checkpoint_first: int | None = None,
                 checkpoint_last: bool = False):
        self.model = stacked
        self.opt = StackedOptimizer(opt_kind, opt_hp, stacked.params)
        self.n, self.batch_size, self.seed = int(n_rows), int(batch_size), int(seed)
        self.clip = clip_grad_norm
        self.x_test, self.y_test = x_test, y_test
        self.steps_per_epoch = steps_per_epoch(self.n, self.batch_size)
        self.checkpoint_steps = checkpoint_steps(epochs * self.steps_per_epoch, self.steps_per_epoch,
                                                 checkpoint_every, checkpoint_first, checkpoint_last)
        self._recorded = set(self.checkpoint_steps)
        self.dtype = stacked.params[0].dtype
        self.clock = 0

    def plan(self, epoch: int, b: int) -> tuple[list[StepGroup], torch.Tensor]:
        """Each run's batch in step b of `epoch`: groups of runs of equal batch length, and
        active [R] (false: the run has no batch in this step)."""
        raise NotImplementedError

    def before_step(self) -> None:
        """Called before every step (the leave-one-out runs take the full run's start here)."""

    def step(self, epoch: int, b: int) -> None:
        groups, active = self.plan(epoch, b)
        device = self.model.params[0].device
        self.before_step()
        if len(groups) == 1 and bool(active.all()):
            torch.manual_seed(step_seed(self.seed, self.clock))
            g = groups[0]
            grads = self.model.grads(None, g.idx.to(device), g.w.to(device))
        else:
            grads = [torch.zeros_like(p) for p in self.model.params]
            for g in groups:
                torch.manual_seed(step_seed(self.seed, self.clock))  # each batch length draws like the reference
                rows = g.rows.to(device)
                part = self.model.grads(rows, g.idx.to(device), g.w.to(device))
                for full, p in zip(grads, part):
                    full[rows] = p
        if self.clip is not None:
            clip_grad_norm_per_run(grads, float(self.clip))
        self.opt.step(grads, None if bool(active.all()) else active.to(device))
        self.clock += 1
        if self.clock in self._recorded:
            self.record()

    def record(self) -> None:
        """Measure every run at a checkpoint."""
        raise NotImplementedError

    @property
    def n_recorded(self) -> int:
        """How many checkpoints have been recorded."""
        raise NotImplementedError

    def run(self, epochs: int) -> None:
        """Plain loop without Lightning."""
        with torch.random.fork_rng(devices=[]):
            for epoch in range(epochs):
                for b in range(self.steps_per_epoch):
                    self.step(epoch, b)


class GroupTrainer(StackedRuns):
    """Further-trains R runs of one seed together: the full-data run(s) and leave-one-out runs.
    left_out [R] with is_full [R] marking the full-data run(s); each run's batches come from the
    seed's permutations `perms` (:func:`plan_step`). At each checkpoint `losses` collects
    [R, n_test] float64 and, when the group holds a full-data run, `distances` that run's
    ‖θ_t − θ_0‖₂ (a float64 scalar)."""

    def __init__(self, stacked: StackedModel, opt_kind: str, opt_hp: dict, perms: list[torch.Tensor],
                 left_out: torch.Tensor, is_full: torch.Tensor, batch_size: int, removal: str, seed: int,
                 x_test: torch.Tensor, y_test: torch.Tensor, epsilon: float | None = None,
                 clip_grad_norm: float | None = None, checkpoint_every: int | None = None,
                 checkpoint_first: int | None = None, checkpoint_last: bool = False):
        super().__init__(stacked, opt_kind, opt_hp, len(perms[0]), len(perms), batch_size, seed, x_test, y_test,
                         clip_grad_norm, checkpoint_every, checkpoint_first, checkpoint_last)
        self.perms, self.left_out, self.is_full = perms, left_out, is_full
        self.removal = removal
        self.eps = 1.0 / self.n if epsilon is None else float(epsilon)
        self.losses: list[torch.Tensor] = []
        self.distances: list[torch.Tensor] = []
        full = is_full.nonzero().flatten()
        self.full_row = int(full[0]) if len(full) else None
        self._start: list[torch.Tensor] | None = None  # the full run's parameters before its first step
        self._positions: dict[int, torch.Tensor] = {}

    def positions(self, epoch: int) -> torch.Tensor:
        """[R] position of each run's left-out instance in the epoch's permutation."""
        if epoch not in self._positions:
            inv = torch.empty(self.n, dtype=torch.long)
            inv[self.perms[epoch]] = torch.arange(self.n)
            lo = torch.where(self.is_full, torch.zeros_like(self.left_out), self.left_out)
            self._positions = {epoch: torch.where(self.is_full, torch.full_like(lo, self.n), inv[lo])}
        return self._positions[epoch]

    def plan(self, epoch: int, b: int) -> tuple[list[StepGroup], torch.Tensor]:
        return plan_step(self.perms[epoch], self.positions(epoch), self.left_out, self.is_full, b, self.batch_size,
                         self.removal, self.eps, self.dtype)

    def before_step(self) -> None:
        if self._start is None and self.full_row is not None:  # taken here, on the device the runs train on
            self._start = [p[self.full_row].clone() for p in self.model.params]

    def record(self) -> None:
        self.losses.append(self.model.test_losses(self.x_test, self.y_test))
        if self.full_row is not None:
            self.distances.append(distance_from_start([p[self.full_row] for p in self.model.params], self._start))

    @property
    def n_recorded(self) -> int:
        return len(self.losses)

    def run(self, epochs: int) -> torch.Tensor:
        """Plain loop without Lightning; returns [n_checkpoints, n_test, R] float64."""
        super().run(epochs)
        return self.result()

    def result(self) -> torch.Tensor:
        return torch.stack(self.losses).transpose(1, 2).contiguous()  # [T, n_test, R]

    def distance_from_start(self) -> torch.Tensor:
        """[n_checkpoints] float64: the group's full-data run's ‖θ_t − θ_0‖₂ at each checkpoint."""
        if self.full_row is None:
            raise ValueError("this group of runs holds no full-data run, whose distance from the start is recorded")
        return torch.stack(self.distances)


def fit_runs(runs: StackedRuns, epochs: int, accelerator: str, dtype: torch.dtype) -> None:
    """Train one group of runs for `epochs` under a Lightning Trainer (its own bar off: a job shows
    one bar over all its groups); raises if the Trainer stopped before every checkpoint was recorded."""
    trainer = L.Trainer(max_epochs=epochs, accelerator=accelerator, devices=1,
                        precision="64-true" if dtype == torch.float64 else "32-true", logger=False,
                        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(FurtherTrainingModule(runs))
    expected = len(runs.checkpoint_steps)
    if trainer.interrupted or runs.n_recorded != expected:
        # never write a seed whose runs did not finish (Lightning swallows some interruptions)
        raise RuntimeError(f"the runs of seed {runs.seed} stopped early ({runs.n_recorded} of {expected} "
                           f"checkpoints); nothing was written for it. Re-run the same command to resume.")


class _Steps(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


class FurtherTrainingModule(L.LightningModule):
    """A StackedRuns (e.g. a GroupTrainer) under a Lightning Trainer: one training step = one step of
    every run.

    Optimisation is manual (the stacked optimizer is not a torch.optim optimizer); the
    engine's tensors move to the Trainer's device at the start of fit."""

    def __init__(self, trainer: StackedRuns, desc: str = ""):
        super().__init__()
        self.automatic_optimization = False
        self.engine = trainer
        self.desc = desc
        self._rng = None

    def on_fit_start(self):
        if self.device.type != "cpu":
            self.engine.model.to(self.device)
            self.engine.opt.params = self.engine.model.params
        # steps reseed the global generator (matched dropout masks); restore it afterwards
        self._rng = torch.random.get_rng_state()

    def on_fit_end(self):
        if self._rng is not None:
            torch.random.set_rng_state(self._rng)

    def train_dataloader(self):
        return DataLoader(_Steps(self.engine.steps_per_epoch), batch_size=None, shuffle=False)

    def training_step(self, batch, batch_idx):
        self.engine.step(self.current_epoch, int(batch))
        return None

    def configure_optimizers(self):
        return None
