"""Further training, one run at a time: the plain, obviously-correct formulation of docs/method.md §2

This is the reference the stacked engine is tested against (tests/test_further_training_engine.py)
and benchmarked against (benchmarks/further_training.py); `further_training.engine=reference`
also runs it for real. It is the obvious implementation (the authors' code is built the same
way): one model, one `torch.optim` optimizer, a `DataLoader` over a `TensorDataset` with
PyTorch's own samplers:

- Every run of a seed starts from θᶠ with a fresh optimizer. The batch order comes from
  `RandomSampler(range(n), generator=torch.Generator().manual_seed(seed))`, iterated once per
  epoch. (That sampler draws two permutations per epoch from its generator — the second,
  sliced to zero length, for the `num_samples % n` remainder — so the permutations are
  taken from the sampler itself rather than re-derived.) The full run and every left-out
  run of a seed see the same permutations.
- `drop`: :class:`DeleteSampler` yields the same permutation with j deleted, so later
  batches shift by one and the last batch is one smaller (or vanishes).
- `downweight`: identical batches; each step's loss is mean(batch) − ε·loss(z_j), ε = 1/n
  by default. z_j is forwarded as an extra row of the batch; the full run forwards a
  zero-weight copy of the batch's first row instead, so both runs forward the same shapes.
- `mask`: identical batches; j's loss is removed from the one batch holding it (mean over
  the rest).
- Dropout masks are matched between a seed's runs: before each step the global generator
  is seeded from (seed, step), where the step clock is the full run's (epoch, batch), so
  runs forwarding the same shapes draw the same masks.
- Checkpoints at the steps of that clock that tda.further_training.checkpoints.checkpoint_steps
  lists (after every epoch, or every k steps from a first step, and optionally the last step);
  the full-data run also records its distance from the start, ‖θ_t − θ_0‖₂.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, Sampler, TensorDataset

from tda.further_training.checkpoints import checkpoint_steps, distance_from_start, steps_per_epoch
from tda.models.base import per_example_loss


def epoch_permutations(n: int, epochs: int, seed: int) -> list[torch.Tensor]:
    """The orders in which `RandomSampler(range(n), generator=Generator().manual_seed(seed))`
    visits the data in successive epochs: [epochs] tensors of [n]."""
    sampler = RandomSampler(range(n), generator=torch.Generator().manual_seed(seed))
    return [torch.tensor(list(iter(sampler)), dtype=torch.long) for _ in range(epochs)]


class DeleteSampler(Sampler[int]):
    """The order of `base` with the index `left_out` deleted (the `drop` left-out run)."""

    def __init__(self, base: Sampler[int], left_out: int):
        self.base, self.left_out = base, left_out

    def __iter__(self) -> Iterator[int]:
        return (i for i in self.base if i != self.left_out)

    def __len__(self) -> int:
        return len(self.base) - 1  # type: ignore[arg-type]


def step_seed(seed: int, step: int) -> int:
    """Seed of the global generator before step `step` (full-run clock) of seed `seed`: the
    dropout masks of that step."""
    return (int(seed) * 1_000_003 + int(step) * 7_919 + 12_345) % (2 ** 62)


@torch.no_grad()
def test_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    """[n_test] per-test-instance losses in eval mode, returned in float64."""
    was = model.training
    model.eval()
    out = per_example_loss(model(x), y, task).double()
    model.train(was)
    return out


@dataclass
class RunRecord:
    """What one further-training run records at its checkpoints: losses [n_checkpoints, n_test]
    float64 (test losses, or what its `measure` returns), distance_from_start [n_checkpoints]
    float64 (‖θ_t − θ_0‖₂ over the trainable parameters) and steps (the checkpoints' steps of the full run's clock)."""

    losses: torch.Tensor
    distance_from_start: torch.Tensor
    steps: list[int]


def further_train_record(model: nn.Module, optimizer: Callable, x: torch.Tensor, y: torch.Tensor,
                         x_test: torch.Tensor, y_test: torch.Tensor, task: str, n_epochs: int, seed: int,
                         batch_size: int, left_out: int | None, removal: str,
                         checkpoint_every: int | None = None, epsilon: float | None = None,
                         clip_grad_norm: float | None = None, checkpoint_first: int | None = None,
                         checkpoint_last: bool = False, measure: Callable[[nn.Module], torch.Tensor] | None = None,
                         dropout_seed: int | None = None) -> RunRecord:
    """Train a copy of `model` further and record it at each checkpoint (tda.further_training.
    checkpoints.checkpoint_steps of the checkpoint_* arguments).

    `left_out=None` is the full-data run; `optimizer` builds a torch.optim optimizer from a
    parameter list. `measure(model)` is what is recorded at a checkpoint (default: the test
    losses); `dropout_seed` the seed of the step's dropout masks (default: `seed`, which also
    orders the batches: a subset's run orders its own rows but shares its seed's masks)."""
    model = copy.deepcopy(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    opt = optimizer(params)
    n = len(x)
    eps = 1.0 / n if epsilon is None else float(epsilon)
    sampler = RandomSampler(range(n), generator=torch.Generator().manual_seed(seed))
    run_sampler = DeleteSampler(sampler, left_out) if (left_out is not None and removal == "drop") else sampler
    loader = DataLoader(TensorDataset(x, y, torch.arange(n)), batch_size=batch_size, sampler=run_sampler)
    full_steps = steps_per_epoch(n, batch_size)  # the step clock is the full run's
    steps = checkpoint_steps(n_epochs * full_steps, full_steps, checkpoint_every, checkpoint_first, checkpoint_last)
    recorded = set(steps)
    losses, distances, clock = [], [], 0

    def tick():
        nonlocal clock
        clock += 1
        if clock in recorded:
            losses.append(test_losses(model, x_test, y_test, task) if measure is None else measure(model))
            distances.append(distance_from_start(params, start))

    wdtype = params[0].dtype  # loss weights in the model's dtype (inputs may be token ids)
    with torch.random.fork_rng(devices=[]):
        for _ in range(n_epochs):
            epoch_start = clock
            for xb, yb, idx in loader:
                weights = torch.full((len(idx),), 1.0 / len(idx), dtype=wdtype)
                if removal == "mask" and left_out is not None and bool((idx == left_out).any()):
                    keep = idx != left_out
                    weights = keep.to(wdtype) / max(int(keep.sum()), 1)
                if removal == "downweight":
                    extra = left_out if left_out is not None else int(idx[0])
                    xb, yb = torch.cat([xb, x[extra:extra + 1]]), torch.cat([yb, y[extra:extra + 1]])
                    weights = torch.cat([weights, torch.tensor([-eps if left_out is not None else 0.0], dtype=wdtype)])
                torch.manual_seed(step_seed(seed if dropout_seed is None else dropout_seed, clock))
                opt.zero_grad(set_to_none=True)
                loss = (per_example_loss(model(xb), yb, task) * weights).sum()
                loss.backward()
                if clip_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
                opt.step()
                tick()
            while clock < epoch_start + full_steps:  # a `drop` run's epoch may be one batch shorter
                tick()
    return RunRecord(torch.stack(losses), torch.stack(distances), steps)


def further_train_run(model: nn.Module, optimizer: Callable, x: torch.Tensor, y: torch.Tensor,
                      x_test: torch.Tensor, y_test: torch.Tensor, task: str, n_epochs: int, seed: int,
                      batch_size: int, left_out: int | None, removal: str,
                      checkpoint_every: int | None = None, epsilon: float | None = None,
                      clip_grad_norm: float | None = None, checkpoint_first: int | None = None,
                      checkpoint_last: bool = False) -> torch.Tensor:
    """The test losses [n_checkpoints, n_test] of :func:`further_train_record` (same arguments)."""
    return further_train_record(model, optimizer, x, y, x_test, y_test, task, n_epochs, seed, batch_size, left_out,
                                removal, checkpoint_every, epsilon, clip_grad_norm, checkpoint_first,
                                checkpoint_last).losses
