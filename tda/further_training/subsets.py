"""What a run of the subset gold standard is (docs/lds.md): the random subsets, each run's own
batches, what is measured on the test instances, and the runs of a seed trained side by side.

- :func:`draw_subsets`: `count` subsets keeping ⌊fraction · n⌋ training rows each, drawn from
  `further_training.subsets.seed`: masks [m, n_train] (bool).
- A run on subset S is a fresh training on S's rows alone: a data loader over those rows (in
  ascending row order) with its own `RandomSampler`, seeded by :func:`run_seed` of (seed of
  the gold standard, subset), so its permutations and batches are its own; an epoch has
  ⌈|S| / batch_size⌉ steps. Dropout masks are the seed's (one per step, shared by its runs, as
  in every stacked run).
- :class:`SubsetRuns`: the runs of one seed on a block of subsets in the stacked engine
  (tda.further_training.engine.StackedRuns): every subset keeps the same number of rows, so
  all runs take batches of the same length in every step; `idx` [r, M] holds each run's rows.
- :func:`reference_run`: one run at a time (tda.further_training.reference's plain loop on the
  subset's rows), what `further_training.engine=reference` computes and the engine equals.
- :func:`measured`: at every checkpoint each run's test instances give the LDS target the
  peers use: TRAK's margin (correct logit − logsumexp of the others) for classification, the
  prediction for regression, and the loss in either case (`OUTPUTS`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tda.further_training.engine import StackedRuns, StepGroup
from tda.further_training.reference import epoch_permutations, further_train_record
from tda.further_training.settings import SubsetSettings
from tda.further_training.stacked import StackedModel
from tda.models.base import per_example_loss

# what each run records per test instance and checkpoint, by task: the target, then the loss
OUTPUTS = {"classification": ("margin", "loss"), "regression": ("prediction", "loss")}


def draw_subsets(n_train: int, settings: SubsetSettings) -> torch.Tensor:
    """masks [count, n_train] (bool): subset i keeps the ⌊fraction · n_train⌋ rows where masks[i]
    is true; each subset the first rows of a permutation drawn in turn from one generator seeded
    by `settings.seed`, so a block of subsets is the same whichever job draws it."""
    k = settings.size(n_train)
    if not 0 < k < n_train:
        raise ValueError(f"further_training.subsets.fraction={settings.fraction} keeps {k} of the {n_train} training "
                         f"rows; a subset must keep at least one row and leave at least one out: choose a fraction "
                         f"in ({1 / n_train:.3g}, 1)")
    g = torch.Generator().manual_seed(int(settings.seed))
    masks = torch.zeros(settings.count, n_train, dtype=torch.bool)
    for i in range(settings.count):
        masks[i, torch.randperm(n_train, generator=g)[:k]] = True
    return masks


def run_seed(seed: int, subset: int) -> int:
    """The seed of the batch order of subset `subset`'s run in seed `seed` of the gold standard."""
    return (int(seed) * 1_000_033 + int(subset) * 104_729 + 7_777) % (2 ** 62)


def initialisation_seed(seed: int) -> int:
    """The seed under which `subsets.initialisation=per_seed` draws seed `seed`'s initial weights."""
    return (int(seed) * 2_000_003 + 424_242) % (2 ** 62)


def margin(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """TRAK's margin of each row: out [..., n, C], y [n] -> [..., n]: the correct class's logit
    minus the logsumexp of the others (its loss is softplus(−margin), so the two order a test
    instance's runs in reverse)."""
    idx = y.reshape(*([1] * (out.dim() - 2)), -1, 1).expand(*out.shape[:-1], 1)
    correct = out.gather(-1, idx).squeeze(-1)
    others = out.scatter(-1, idx, float("-inf"))
    return correct - torch.logsumexp(others, dim=-1)


def measured(out: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    """out [..., n_test, n_outputs] -> [..., n_test, 2] float64: OUTPUTS[task] of each test instance."""
    target = margin(out, y) if task == "classification" else out.reshape(*out.shape[:-1])
    loss = torch.stack([per_example_loss(o, y, task) for o in out.reshape(-1, *out.shape[-2:])])
    return torch.stack([target.double(), loss.reshape(target.shape).double()], dim=-1)


def kept_rows(masks: torch.Tensor) -> torch.Tensor:
    """[m, k] the training rows each subset keeps, ascending (every subset keeps k rows)."""
    k = int(masks[0].sum())
    return masks.nonzero()[:, 1].reshape(len(masks), k)


def subset_orders(kept: torch.Tensor, subsets: list[int], seed: int, epochs: int) -> list[torch.Tensor]:
    """[epochs] tensors [r, k]: the training rows in the order each run visits them, epoch by epoch.
    kept [r, k]: the subsets' rows; subsets [r]: their indices (which seed each run's order)."""
    perms = [epoch_permutations(kept.shape[1], epochs, run_seed(seed, i)) for i in subsets]
    return [torch.stack([kept[r][perms[r][e]] for r in range(len(subsets))]) for e in range(epochs)]


class SubsetRuns(StackedRuns):
    """The runs of one seed on the subsets `kept` [r, k] (rows of the training set), trained side
    by side: in step b each run's batch is the next batch_size of its own order (the last batch
    of an epoch shorter, equally for all). `outputs` collects [r, n_test, 2] at each checkpoint
    (:func:`measured`)."""

    def __init__(self, stacked: StackedModel, opt_kind: str, opt_hp: dict, orders: list[torch.Tensor],
                 batch_size: int, seed: int, x_test: torch.Tensor, y_test: torch.Tensor, task: str,
                 clip_grad_norm: float | None = None, checkpoint_every: int | None = None,
                 checkpoint_first: int | None = None, checkpoint_last: bool = False):
        super().__init__(stacked, opt_kind, opt_hp, orders[0].shape[1], len(orders), batch_size, seed, x_test, y_test,
                         clip_grad_norm, checkpoint_every, checkpoint_first, checkpoint_last)
        self.orders, self.task = orders, task
        self.outputs: list[torch.Tensor] = []

    def plan(self, epoch: int, b: int) -> tuple[list[StepGroup], torch.Tensor]:
        idx = self.orders[epoch][:, b * self.batch_size:(b + 1) * self.batch_size]
        R = len(idx)
        w = torch.full(idx.shape, 1.0 / idx.shape[1], dtype=self.dtype)
        return [StepGroup(torch.arange(R), idx, w)], torch.ones(R, dtype=torch.bool)

    def record(self) -> None:
        self.outputs.append(measured(self.model.test_outputs(self.x_test), self.y_test.cpu(), self.task))

    @property
    def n_recorded(self) -> int:
        return len(self.outputs)

    def result(self) -> torch.Tensor:
        """[n_checkpoints, n_test, r, 2] float64."""
        return torch.stack(self.outputs).transpose(1, 2).contiguous()


def reference_run(model: nn.Module, optimizer: Callable, x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor,
                  y_test: torch.Tensor, task: str, kept: torch.Tensor, subset: int, seed: int, epochs: int,
                  batch_size: int, clip_grad_norm: float | None = None, checkpoint_every: int | None = None,
                  checkpoint_first: int | None = None, checkpoint_last: bool = False) -> torch.Tensor:
    """One run of seed `seed` on subset `subset` (rows `kept` [k]), the plain loop: a copy of
    `model`, a torch.optim optimizer, a data loader over the subset's rows alone. Returns
    [n_checkpoints, n_test, 2] float64 (:func:`measured`)."""
    def measure(m: nn.Module) -> torch.Tensor:
        was = m.training
        m.eval()
        with torch.no_grad():
            out = measured(m(x_test), y_test, task)
        m.train(was)
        return out

    return further_train_record(model, optimizer, x[kept], y[kept], x_test, y_test, task, epochs,
                                run_seed(seed, subset), batch_size, None, "drop", checkpoint_every, None,
                                clip_grad_norm, checkpoint_first, checkpoint_last, measure=measure,
                                dropout_seed=seed).losses
