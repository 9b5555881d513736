"""The gold-standard attribution a_t(j, z) (docs/method.md §2) from a gold standard's merged seeds:
:class:`GoldStandard` (what tda.further_training.store.load_gold_standard returns) and
:func:`postprocess` (eq. 13's centring, eq. 17's adjustment, the mean over seeds)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tda.further_training.settings import FurtherTrainingSettings

# The command that computes (or finishes) a gold standard, as messages name it.
FURTHER_TRAIN_COMMAND = "the further_train stage (`tda-further-train <same overrides>`)"


def runs_of(recorded: dict) -> str:
    """`leave_one_out` or `subsets`: the runs of a gold standard's recorded settings (its keyed
    settings, meta.json's `further_training`)."""
    return str(recorded.get("runs", FurtherTrainingSettings.default("runs")))  # absent: at its default


def gold_kind(recorded: dict) -> str:
    """`retraining` or `further training`, and for a subset gold standard `retraining subsets` or
    `further training subsets`: the kind of gold standard of recorded settings (its keyed
    settings, meta.json's `further_training`): retraining starts from the final model's initial
    weights (`start: initial_weights`), further training from θᶠ."""
    start = recorded.get("start", FurtherTrainingSettings.default("start"))  # absent: at its default
    kind = "retraining" if start == "initial_weights" else "further training"
    return f"{kind} subsets" if runs_of(recorded) == "subsets" else kind


def checkpoint_axis(recorded: dict, n_rows: int | None, n_checkpoints: int) -> tuple[str, list[float]]:
    """Name and values of a gold standard's checkpoint axis: the epochs, or, with
    `checkpoint_every_steps`, the steps of the checkpoints of its recorded settings over epochs of
    `n_rows` rows (the training set, or a subset's rows); `n_checkpoints`: how many its files hold."""
    settings = FurtherTrainingSettings.from_record(recorded)
    if not settings.checkpoint_every_steps:
        return "epoch", [float(i + 1) for i in range(n_checkpoints)]
    if n_rows is None:
        raise ValueError(f"the gold standard's meta.json records no n_train, which the steps of its checkpoints "
                         f"are computed from; delete it and re-run {FURTHER_TRAIN_COMMAND}")
    steps = settings.checkpoint_steps(n_rows)
    if len(steps) != n_checkpoints:
        raise ValueError(f"the gold standard's settings give {len(steps)} checkpoints but its files hold "
                         f"{n_checkpoints}; delete it and re-run {FURTHER_TRAIN_COMMAND}")
    return "step", [float(s) for s in steps]


@dataclass
class GoldStandard:
    """All completed seeds of a gold standard.

    diff [n_checkpoints, n_test, n_left_out, n_seeds], full_loss [n_checkpoints, n_test, n_seeds],
    initial_loss [n_test]; distance_from_start [n_checkpoints, n_seeds]: each seed's full-data run's
    ‖θ_t − θ_start‖₂, None when a merged file predates it."""

    diff: torch.Tensor
    full_loss: torch.Tensor
    initial_loss: torch.Tensor
    seeds: list[int]
    meta: dict
    files: dict[str, str] = field(default_factory=dict)  # file name -> checksum of every file merged
    distance_from_start: torch.Tensor | None = None

    @property
    def n_checkpoints(self) -> int:
        return self.diff.shape[0]

    @property
    def kind(self) -> str:
        """`further training` or `retraining` (:func:`gold_kind`)."""
        return gold_kind(self.meta["further_training"])

    def checkpoint_axis(self) -> tuple[str, list[float]]:
        """Name and values of the x axis: the epochs, or, with `checkpoint_every_steps`, the steps of
        the checkpoints (FurtherTrainingSettings.checkpoint_steps of the recorded settings and
        meta.json's n_train)."""
        return checkpoint_axis(self.meta["further_training"], self.meta.get("n_train"), self.n_checkpoints)

    def attribution(self, center: bool = True, adjust: bool = True,
                    seeds: slice | list[int] | None = None) -> torch.Tensor:
        """a_t(j, z) of docs/method.md §2 averaged over seeds: [n_checkpoints, n_test, n_left_out].

        `adjust=False` drops eq. 17's subtraction of the full run (uses loss(D∖j) − loss(θᶠ));
        `center` subtracts the mean over left-out instances (eq. 13) per test instance,
        checkpoint and seed. `seeds` selects seed positions (a window of seeds)."""
        return postprocess(self.diff, self.full_loss, self.initial_loss, center=center, adjust=adjust, seeds=seeds)

    def windows(self, k: int, center: bool = True, adjust: bool = True) -> list[torch.Tensor]:
        """The attribution of each non-overlapping window of k seeds (in seed order); a
        remainder shorter than k is left out. Each [n_checkpoints, n_test, n_left_out]."""
        S = len(self.seeds)
        return [self.attribution(center=center, adjust=adjust, seeds=slice(i, i + k)) for i in range(0, S - k + 1, k)]


def postprocess(diff: torch.Tensor, full_loss: torch.Tensor, initial_loss: torch.Tensor, center: bool = True,
                adjust: bool = True, seeds: slice | list[int] | None = None) -> torch.Tensor:
    """diff [T, n_test, n_left_out, S] -> attribution [T, n_test, n_left_out].

    adjust (eq. 17): loss(D∖j) − loss(D) as stored; without it loss(D∖j) − loss(θᶠ).
    center (eq. 13): minus the mean over left-out instances, per test instance, checkpoint
    and seed, before the mean over seeds."""
    if seeds is not None:
        diff, full_loss = diff[..., seeds], full_loss[..., seeds]
    if diff.shape[-1] == 0:
        raise ValueError("no seeds selected for the gold standard average")
    a = diff if adjust else diff + (full_loss - initial_loss[None, :, None]).unsqueeze(2)
    if center:
        # a constant row centres to exactly 0 (its mean can round off the constant: residues of
        # ~1e-17 would give a scale-free cosine a direction that is only rounding)
        constant = a.amax(dim=2, keepdim=True) == a.amin(dim=2, keepdim=True)
        a = torch.where(constant, 0.0, a - a.mean(dim=2, keepdim=True))
    return a.mean(dim=-1)
