"""What further training records, and when: the checkpoint schedule and the distance travelled.

:func:`checkpoint_steps` is the one place that turns the schedule settings
(`further_training.checkpoint_every_steps`, `checkpoint_first_step`, `checkpoint_last_step`) into
step numbers; every engine (stacked, reference, derivative) records at those steps and the store
labels its checkpoint axis with them. Steps count the full-data run's optimizer steps from 1
(the step clock of tda.further_training.reference), so a checkpoint at step s holds the state
after s steps; an epoch has ⌈n / batch_size⌉ of them.

:func:`distance_from_start` is ‖θ_t − θ_start‖₂ over the trainable parameters, recorded for the
full-data run at every checkpoint (the authors log it beside their curves).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Optimizer steps of one epoch over `n_train` instances in batches of `batch_size` (the last
    batch may be short): ⌈n_train / batch_size⌉. The one definition every engine, the store and
    the settings use."""
    return -(-int(n_train) // int(batch_size))


def checkpoint_steps(total_steps: int, steps_per_epoch: int, every: int | None = None, first: int | None = None,
                     last: bool = False) -> list[int]:
    """The steps after which test losses are recorded, ascending.

    every=None: after every epoch (steps_per_epoch, 2·steps_per_epoch, ..., total_steps);
    every=k: first, first + k, first + 2k, ... up to total_steps, first defaulting to k (k, 2k, ...);
    last: total_steps is a checkpoint too (if it is not one already). Raises ValueError naming the
    setting when no checkpoint (or the first one) would fall within the total_steps steps."""
    if every is None:
        if first is not None:
            raise ValueError(f"further_training.checkpoint_first_step={first} needs further_training."
                             f"checkpoint_every_steps (checkpoints after every epoch have no first step to move); "
                             f"set checkpoint_every_steps or leave checkpoint_first_step null")
        return list(range(steps_per_epoch, total_steps + 1, steps_per_epoch))
    n_epochs = total_steps // steps_per_epoch
    epochs = f"{n_epochs} epoch{'' if n_epochs == 1 else 's'} of {steps_per_epoch}"
    if first is None and every > total_steps:
        raise ValueError(f"further_training.checkpoint_every_steps={every} exceeds the {total_steps} steps of further "
                         f"training ({epochs}), so no checkpoint would be recorded; lower it or set it to null (a "
                         f"checkpoint after every epoch)")
    start = every if first is None else first
    if not 1 <= start <= total_steps:
        raise ValueError(f"further_training.checkpoint_first_step={first} is not one of the {total_steps} steps of "
                         f"further training ({epochs}); choose a step in 1..{total_steps} or null (the step "
                         f"checkpoint_every_steps={every})")
    steps = list(range(start, total_steps + 1, every))
    if last and steps[-1] != total_steps:
        steps.append(total_steps)
    return steps


def distance_from_start(params: Sequence[torch.Tensor], start: Sequence[torch.Tensor]) -> torch.Tensor:
    """‖θ − θ_start‖₂ over the parameter tensors `params` (each [...], matched to `start`), as a
    float64 scalar on the CPU (summed in float64, whatever the parameters' dtype)."""
    total = sum(((p.detach().double() - s.detach().double()) ** 2).sum() for p, s in zip(params, start, strict=True))
    return torch.as_tensor(total, dtype=torch.float64).sqrt().cpu()
