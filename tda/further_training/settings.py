"""The settings of the gold standard (the `further_training` section), their defaults and checks.

What they mean is in docs/method.md (the protocol) and docs/further_training.md. Each says
whether it defines the gold standard (its key, tda.further_training.store.GoldStandardSpec) or
only how or which part of it a job computes (`key=NOT_KEYED`: every engine and shard writes into
one directory); the seeds and the left-out block of one job follow from the section too.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

from tda.further_training.checkpoints import checkpoint_steps, steps_per_epoch
from tda.ranges import SEED, SEED_MAX, Range, memory_problem
from tda.sections import KEYED_UNLESS_DEFAULT, NOT_KEYED, Checks, Section, setting
from tda.training import TrainSettings

Removal = Literal["drop", "downweight", "mask"]
Engine = Literal["stacked", "reference"]
Estimator = Literal["difference", "derivative"]
DerivativeMode = Literal["auto", "forward", "reverse"]
Start = Literal["final_model", "initial_weights"]
Runs = Literal["leave_one_out", "subsets"]
Initialisation = Literal["recorded", "per_seed"]
REMOVAL_MODES: tuple[str, ...] = typing.get_args(Removal)
ENGINES: tuple[str, ...] = typing.get_args(Engine)
ESTIMATORS: tuple[str, ...] = typing.get_args(Estimator)
DERIVATIVE_MODES: tuple[str, ...] = typing.get_args(DerivativeMode)
STARTS: tuple[str, ...] = typing.get_args(Start)
RUNS: tuple[str, ...] = typing.get_args(Runs)


def shard_block(n_left_out: int, index: int, count: int) -> tuple[int, int]:
    """[start, stop) of left-out shard `index` of `count`: contiguous, sizes differ by at most one."""
    return index * n_left_out // count, (index + 1) * n_left_out // count


@dataclass(frozen=True)
class LeftOutShard(Section):
    """`further_training.left_out_shard`: this job's contiguous block of the left-out instances."""

    PATH = "further_training.left_out_shard"
    index: int = setting(0, "which block, 0..count-1")
    count: int = setting(1, "into how many blocks the left-out instances are split")

    def check(self, c: Checks) -> None:
        index, count = c.value("index"), c.value("count")
        if count is not None and count < 1:
            c.add(f"{self.PATH}.count={count!r} must be a positive number of shards")
        elif index is not None and count is not None and not 0 <= index < count:
            c.add(f"{self.PATH}.index={index!r} must be in 0..{count - 1} ({self.PATH}.count={count})")


@dataclass(frozen=True)
class SubsetBlock(LeftOutShard):
    """`further_training.subsets.block`: this job's contiguous block of the random subsets."""

    PATH = "further_training.subsets.block"
    index: int = setting(0, "which block, 0..count-1")
    count: int = setting(1, "into how many blocks the subsets are split")


@dataclass(frozen=True)
class SubsetSettings(Section):
    """`further_training.subsets`: the random subsets of the subset gold standard (`runs: subsets`,
    docs/lds.md): `count` subsets, each keeping ⌊fraction · n_train⌋ training rows, drawn from
    `seed`; each seed of the gold standard trains one model per subset on its rows alone."""

    PATH = "further_training.subsets"
    count: int = setting(100, "random subsets of the training set (m)")
    fraction: float = setting(0.5, "fraction α of the training set each subset keeps (⌊α · n_train⌋ rows)",
                              "a fraction strictly between 0 and 1, e.g. 0.5 (TRAK's) or 0.99")
    seed: int = setting(0, "seed of the draw of the subsets (their masks are stored with the outputs)")
    initialisation: Initialisation = setting("recorded", "recorded: every run starts from the recorded start (θᶠ, "
                                             "or the final model's initial weights) | per_seed (retraining only): "
                                             "fresh initial weights drawn for each seed of the gold standard")
    block: SubsetBlock = setting(SubsetBlock(), "this job's block of the subsets", key=NOT_KEYED)

    def check(self, c: Checks) -> None:
        c.positive("count")
        c.in_range("seed", SEED)
        fraction = c.value("fraction")
        if fraction is not None and not 0 < fraction < 1:
            c.add(f"further_training.subsets.fraction={fraction} must be strictly between 0 and 1 (the fraction of the "
                  f"training set each subset keeps), e.g. 0.5 or 0.99")
        count = c.value("count")
        if count is not None and self.block.count > count:
            c.add(f"further_training.subsets.block.count={self.block.count} splits the {count} subsets into more "
                  f"blocks than there are subsets; use at most {count} blocks")

    def size(self, n_train: int) -> int:
        """Training rows each subset keeps: ⌊fraction · n_train⌋ (as dattri's retrain_lds)."""
        return int(self.fraction * n_train)


@dataclass(frozen=True)
class FurtherTrainingSettings(Section):
    """`further_training`: the gold standard (docs/method.md) and how a job computes it."""

    PATH = "further_training"
    epochs: int = setting(3, "epochs of further training", "further-train for at least one epoch")
    batch_size: int = setting(32, "batch size of further training")
    n_seeds: int = setting(4, "seeds (batch orders) averaged",
                           "the gold standard averages over seeds (the paper: 100; 10-20 capture most of the benefit)")
    seed_offset: int = setting(0, "seeds are seed_offset .. seed_offset + n_seeds - 1")
    start: Start = setting("final_model", "final_model: further training from θᶠ | initial_weights: retraining from "
                           "the final model's initial weights with its final-training schedule "
                           "(gold_standard=retraining)", key=KEYED_UNLESS_DEFAULT)
    removal: Removal = setting("drop", "how instance j is removed: drop | downweight | mask")
    checkpoint_every_steps: int | None = setting(None, "a checkpoint every this many steps",
                                                 "null puts a checkpoint after every epoch")
    checkpoint_first_step: int | None = setting(None, "with checkpoint_every_steps k: checkpoints at this step, "
                                                "then every k steps", "null starts at step k (k, 2k, ...)",
                                                key=KEYED_UNLESS_DEFAULT)
    checkpoint_last_step: bool = setting(False, "the last step of further training is a checkpoint too",
                                         key=KEYED_UNLESS_DEFAULT)
    epsilon: float | None = setting(None, "downweight ε", "null uses 1/n")
    clip_grad_norm: float | None = setting(None, "gradient norm clipping", "null disables clipping")
    batchnorm_momentum: float | None = setting(None, "batch-norm momentum; 0 freezes the running statistics",
                                               "null keeps the model's own momentum", key=KEYED_UNLESS_DEFAULT)
    dtype: Literal["float32", "float64"] = setting("float64", "float64 resolves the tiny loss differences")
    runs: Runs = setting("leave_one_out", "leave_one_out: the full-data run and one run per left-out instance | "
                         "subsets: one run per random subset of the training set, trained on its rows alone "
                         "(the linear datamodeling score's gold standard, `further_training.subsets`)",
                         key=KEYED_UNLESS_DEFAULT)
    subsets: SubsetSettings = setting(SubsetSettings(), "runs=subsets: the random subsets (read, and keyed, only then)")
    estimator: Estimator = setting("difference", "difference: loss(D∖j) − loss(D), one run per instance | "
                                   "derivative: its first-order form, further training differentiated in j's loss "
                                   "weight (removal mask or downweight)", key=KEYED_UNLESS_DEFAULT)
    # how / which part a job computes (not part of the gold standard's directory key)
    engine: Engine = setting("stacked", "stacked: all runs of a seed at once | reference: one run at a time",
                             key=NOT_KEYED)
    derivative_mode: DerivativeMode = setting("auto", "estimator=derivative: forward (one tangent per left-out "
                                              "instance) | reverse (one adjoint pass per test instance, every "
                                              "training instance) | auto (reverse when the left-out block is larger "
                                              "than the test set)", key=NOT_KEYED)
    max_runs_per_group: int | None = setting(None, "runs trained together",
                                             "null trains as many runs at once as attribution.memory_budget_mb allows",
                                             key=NOT_KEYED)
    sparse_input: Literal["auto"] | bool = setting("auto", "one-hot first layer by gathering weight rows (MLP)",
                                                   key=NOT_KEYED)
    vmap: Literal["auto"] | bool = setting("auto", "torch.func.vmap over runs (true) or a loop (false)", key=NOT_KEYED)
    progress_bar: bool = setting(True, "one bar over the job's seeds and groups (default: trainer.progress_bar)",
                                 key=NOT_KEYED)
    shard_seeds: list[int] | None = setting(None, "the seeds this job computes", "null computes every seed",
                                            key=NOT_KEYED)
    left_out_shard: LeftOutShard = setting(LeftOutShard(), "this job's block of the left-out instances",
                                           key=NOT_KEYED)

    def check(self, c: Checks) -> None:
        for name in ("epochs", "batch_size", "n_seeds", "checkpoint_every_steps", "checkpoint_first_step",
                     "clip_grad_norm", "max_runs_per_group"):
            c.positive(name)
        if c.value("checkpoint_first_step") is not None and self.checkpoint_every_steps is None:
            c.add(f"further_training.checkpoint_first_step={self.checkpoint_first_step} needs "
                  f"further_training.checkpoint_every_steps (the steps after the first); set it, or leave "
                  f"checkpoint_first_step null for a checkpoint after every epoch")
        c.in_range("epsilon", Range(0, 1, low_open=True, why=" (the weight of j's loss taken off at every step; "
                                                             "the batch mean weighs each instance 1/batch_size)"))
        offset, n_seeds = c.value("seed_offset"), c.value("n_seeds")
        if c.in_range("seed_offset", SEED) and offset is not None and n_seeds is not None and n_seeds > 0 \
                and offset + n_seeds - 1 > SEED_MAX:
            c.add(f"further_training.seed_offset={offset} with n_seeds={n_seeds} reaches seed {offset + n_seeds - 1}, "
                  f"beyond the largest seed {SEED_MAX} (numpy, scikit-learn and Lightning take seeds in [0, 2³²−1]); "
                  f"lower further_training.seed_offset or n_seeds")
        c.within("batchnorm_momentum", 0, 1, " (0 freezes the running statistics)")
        if c.value("estimator") == "derivative":
            if c.value("removal") == "drop":
                c.add("further_training.estimator=derivative cannot remove by drop (deleting j from the batches has "
                      "no derivative); use further_training.removal=mask or further_training.removal=downweight")
            if c.value("engine") == "reference":
                c.add("further_training.engine=reference is an engine of the difference estimator; with "
                      "further_training.estimator=derivative leave engine at stacked")
        if c.value("runs") == "subsets":
            self._check_subsets(c)
        shard_seeds, n_seeds, offset = c.value("shard_seeds"), c.value("n_seeds"), c.value("seed_offset")
        if shard_seeds is None:
            return
        if n_seeds is not None and offset is not None:
            outside = sorted(set(shard_seeds) - set(range(offset, offset + n_seeds)))
            if outside:
                c.add(f"further_training.shard_seeds contains {outside}, outside the seeds {offset}.."
                      f"{offset + n_seeds - 1} of this gold standard; raise further_training.n_seeds or drop them")
        if len(set(shard_seeds)) != len(shard_seeds):
            c.add(f"further_training.shard_seeds={list(shard_seeds)} lists a seed twice")
        if not shard_seeds:
            c.add("further_training.shard_seeds=[] computes nothing; use null for every seed")

    def _check_subsets(self, c: Checks) -> None:
        """What a subset gold standard cannot be combined with: each run trains on its subset
        alone, so nothing is removed from a full-data run and nothing is differentiated."""
        if c.value("estimator") == "derivative":
            c.add("further_training.runs=subsets trains one model per subset; it has no derivative estimator (the "
                  "derivative gold standard over the whole training set is evaluated as a linear predictor beside it: "
                  "docs/lds.md); leave further_training.estimator at difference")
        if self.left_out_shard.count > 1:
            c.add("further_training.left_out_shard splits the left-out instances of a leave-one-out gold standard; "
                  "split the subsets with further_training.subsets.block.index / .count instead")
        if self.subsets.initialisation == "per_seed" and c.value("start") == "final_model":
            c.add("further_training.subsets.initialisation=per_seed draws fresh initial weights, which only "
                  "retraining (further_training.start=initial_weights, gold_standard=retraining_subsets) starts from; "
                  "further training starts from the final model")

    # settings that only one kind of runs reads: the other's key leaves them out
    SUBSETS_ONLY = ("subsets",)
    LEAVE_ONE_OUT_ONLY = ("removal", "epsilon")

    def keyed(self) -> dict:
        """Section.keyed, less the settings the runs do not read: the subsets for leave-one-out runs
        (so every leave-one-out gold standard keeps the key it had before they existed), the
        removal of an instance for subset runs (each trains on its subset's rows alone)."""
        out = super().keyed()
        for name in self.LEAVE_ONE_OUT_ONLY if self.runs == "subsets" else self.SUBSETS_ONLY:
            out.pop(name, None)
        return out

    @property
    def column_shard(self) -> LeftOutShard:
        """This job's block of the gold standard's columns: the subsets (`subsets.block`) or the
        left-out instances (`left_out_shard`)."""
        return self.subsets.block if self.runs == "subsets" else self.left_out_shard

    @classmethod
    def from_record(cls, recorded: dict) -> "FurtherTrainingSettings":
        """The settings of a gold standard from what it records (its :meth:`keyed` settings,
        meta.json's `further_training`), every other setting at its default."""
        settings, problems = cls.load(recorded)
        if problems:
            raise ValueError("the gold standard records settings this version of tda cannot read:\n  - "
                             + "\n  - ".join(problems) + "\nRecompute it with this version (delete its directory).")
        return settings

    # ------------------------------------------------------------------ the seeds and block of a job
    @property
    def seeds(self) -> list[int]:
        """Every seed of the gold standard: seed_offset .. seed_offset + n_seeds - 1."""
        return [self.seed_offset + i for i in range(self.n_seeds)]

    @property
    def job_seeds(self) -> list[int]:
        """The seeds one job computes: `shard_seeds`, or every seed."""
        return self.seeds if self.shard_seeds is None else [int(s) for s in self.shard_seeds]

    @property
    def is_sharded(self) -> bool:
        """Whether a job computes only part of the gold standard (some seeds, or a left-out block)."""
        return self.shard_seeds is not None or self.column_shard.count > 1

    def left_out_block(self, n_left_out: int) -> tuple[int, int]:
        """[start, stop) of this job's block of `n_left_out` left-out instances (:func:`shard_block`)."""
        return shard_block(n_left_out, self.left_out_shard.index, self.left_out_shard.count)

    # ------------------------------------------------------------------ against the data
    def n_checkpoints(self, n_train: int | None = None) -> int:
        """How many checkpoints the schedule records on `n_train` instances, counted without
        listing them (None: a lower bound, before the data is loaded)."""
        if n_train is None:
            return self.epochs if self.checkpoint_every_steps is None else 1
        total = self.epochs * self.steps_per_epoch(n_train)
        if self.checkpoint_every_steps is None:
            return self.epochs
        start = self.checkpoint_first_step or self.checkpoint_every_steps
        return max(1, (total - start) // self.checkpoint_every_steps + 1 + int(self.checkpoint_last_step))

    def memory_problems(self, n_test: int | None, n_left_out: int | None, n_train: int | None = None) -> list[str]:
        """The merged gold standard's size against this machine's memory: the evaluate stage holds
        `diff` [n_checkpoints, n_test, n_left_out, n_seeds] in float64 (a job holds a seed's share).
        Sizes not known yet (null before the data is loaded) count as 1, a lower bound."""
        n_checkpoints = self.n_checkpoints(n_train)
        nbytes = 8.0 * n_checkpoints * (n_test or 1) * (n_left_out or 1) * self.n_seeds
        sizes = (f"{n_checkpoints} checkpoints × {n_test or '≥ 1'} test × {n_left_out or '≥ 1'} left-out instances "
                 f"× {self.n_seeds} seeds")
        problem = memory_problem(f"further_training.n_seeds={self.n_seeds} with epochs={self.epochs}", nbytes,
                                 f"a gold standard of {sizes} in float64",
                                 "lower further_training.n_seeds (the paper averages 100; 10-20 capture most of the "
                                 "benefit), the epochs or the checkpoints, or the selection's sizes")
        return [problem] if problem else []

    def fit_problems(self, n_left_out: int, n_train: int | None = None, n_test: int | None = None) -> list[str]:
        """The left-out shards against the number of left-out instances; the checkpoint schedule
        against the steps of further training on `n_train` instances; the gold standard's memory
        (:meth:`memory_problems`) once `n_test` is known."""
        problems = []
        if n_train and n_test:
            problems += self.memory_problems(n_test, n_left_out, n_train)
            if problems:
                return problems
        count = self.left_out_shard.count
        if n_left_out and count > n_left_out:
            problems.append(f"further_training.left_out_shard.count={count} splits the {n_left_out} left-out "
                            f"instances into more shards than there are instances; use at most {n_left_out} shards")
        if n_train:
            try:
                self.checkpoint_steps(n_train)
            except ValueError as err:
                problems.append(str(err))
        return problems

    def retraining_problems(self, train: TrainSettings, optimizer: dict, further_optimizer: dict,
                            augmenting_dataset: str | None = None) -> list[str]:
        """With `start: initial_weights` (retraining): every way in which the runs would not repeat
        the final training, given the final training's settings, the resolved `optimizer` and
        `further_optimizer` nodes and the name of the dataset if it augments its inputs in final
        training (DataBundle.final_training_transform), which no run of a gold standard does."""
        if self.start != "initial_weights":
            return []
        fix = "gold_standard=retraining sets it from the final training; remove its override"
        problems = [f"further_training.{mine}={getattr(self, mine)!r} differs from the final training's "
                    f"train.{theirs}={getattr(train, theirs)!r}; {fix}"
                    for mine, theirs in (("epochs", "epochs"), ("batch_size", "batch_size"),
                                         ("clip_grad_norm", "gradient_clip_val"))
                    if getattr(self, mine) != getattr(train, theirs)]
        if further_optimizer != optimizer:
            problems.append(f"further_optimizer {further_optimizer} differs from the final training's optimizer "
                            f"{optimizer}; {fix}")
        if train.final_checkpoint != "last":
            problems.append(f"train.final_checkpoint={train.final_checkpoint}: the final model is the best "
                            f"checkpoint of its training, not the end of a schedule that could be repeated; retrain "
                            f"with train.final_checkpoint=last for the retraining gold standard")
        if augmenting_dataset is not None:
            problems.append(f"dataset {augmenting_dataset} augments its inputs in final training, which the runs of "
                            f"a gold standard never do; turn the augmentation off in the dataset config (and retrain) "
                            f"to retrain from the initial weights")
        return problems

    @property
    def schedule(self) -> dict:
        """The checkpoint schedule's settings, as every engine takes them (checkpoint_every, _first, _last)."""
        return {"checkpoint_every": self.checkpoint_every_steps, "checkpoint_first": self.checkpoint_first_step,
                "checkpoint_last": self.checkpoint_last_step}

    def steps_per_epoch(self, n_train: int) -> int:
        """Optimizer steps of one epoch of the full-data run on `n_train` instances."""
        return steps_per_epoch(n_train, self.batch_size)

    def checkpoint_steps(self, n_train: int) -> list[int]:
        """The checkpoint steps of further training on `n_train` instances
        (tda.further_training.checkpoints.checkpoint_steps of these settings)."""
        spe = self.steps_per_epoch(n_train)
        return checkpoint_steps(self.epochs * spe, spe, self.checkpoint_every_steps, self.checkpoint_first_step,
                                self.checkpoint_last_step)
