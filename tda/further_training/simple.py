"""Further training, one run at a time: the plain, obviously-correct formulation of SPEC §2.

Every run of a seed starts from θᶠ with a fresh `torch.optim` optimizer. Batches come from
one generator per seed that draws a permutation per epoch (exactly what
`RandomSampler(generator=g)` draws); the full run and the left-out runs see the same
permutations. Removal modes:
- `drop`: j is deleted from each epoch's permutation (later batches shift by one).
- `downweight`: identical batches; each step's loss is mean(batch) − ε·loss(z_j), ε = 1/n.
- `mask`: identical batches; j's loss is removed from the one batch holding it (mean over
  the rest).
Dropout masks are matched between a seed's runs by reseeding the global generator at the
start of each run and always forwarding the same shapes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from tda.models.base import per_example_loss


def epoch_permutations(n: int, epochs: int, seed: int) -> list[torch.Tensor]:
    """The permutations `RandomSampler(range(n), generator=torch.Generator().manual_seed(seed))`
    yields in successive epochs."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(n, generator=g) for _ in range(epochs)]


def run_batches(perm: torch.Tensor, batch_size: int, left_out: int | None, removal: str) -> list[torch.Tensor]:
    if left_out is not None and removal == "drop":
        perm = perm[perm != left_out]
    return list(perm.split(batch_size))


@torch.no_grad()
def test_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    """[n_test] per-test-instance losses in eval mode, returned in float64."""
    was = model.training
    model.eval()
    out = per_example_loss(model(x), y, task).double()
    model.train(was)
    return out


def further_train_run(model: nn.Module, optimizer: Callable, x: torch.Tensor, y: torch.Tensor,
                      x_test: torch.Tensor, y_test: torch.Tensor, task: str,
                      perms: list[torch.Tensor], batch_size: int, left_out: int | None, removal: str,
                      checkpoint_every: int | None = None, epsilon: float | None = None,
                      clip_grad_norm: float | None = None, dropout_seed: int = 0) -> torch.Tensor:
    """Train a copy of `model` further; test losses at each checkpoint, [n_checkpoints, n_test].

    `left_out=None` is the full-data run. Checkpoints fall after every epoch, or after every
    `checkpoint_every` optimizer steps when given.
    """
    model = copy.deepcopy(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer(params)
    n = len(x)
    eps = 1.0 / n if epsilon is None else epsilon
    torch.manual_seed(dropout_seed)
    losses, step = [], 0
    for perm in perms:
        for idx in run_batches(perm, batch_size, left_out, removal):
            weights = torch.full((len(idx),), 1.0 / len(idx), dtype=x.dtype)
            if removal == "mask" and left_out is not None and bool((idx == left_out).any()):
                keep = idx != left_out
                weights = keep.to(x.dtype) / max(int(keep.sum()), 1)
            if removal == "downweight":
                # the extra row is z_j in the left-out run and a zero-weight row in the full run,
                # so both runs forward the same shapes and draw the same dropout masks
                extra = left_out if left_out is not None else int(idx[0])
                idx = torch.cat([idx, torch.tensor([extra])])
                weights = torch.cat([weights, torch.tensor([-eps if left_out is not None else 0.0], dtype=x.dtype)])
            opt.zero_grad(set_to_none=True)
            loss = (per_example_loss(model(x[idx]), y[idx], task) * weights).sum()
            loss.backward()
            if clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
            opt.step()
            step += 1
            if checkpoint_every and step % checkpoint_every == 0:
                losses.append(test_losses(model, x_test, y_test, task))
        if not checkpoint_every:
            losses.append(test_losses(model, x_test, y_test, task))
    return torch.stack(losses)
