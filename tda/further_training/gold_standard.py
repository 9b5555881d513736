"""The job that writes the gold standard: further training of the final model, seed by seed,
into `gold/<key>/` (its format, and reading it back: tda.further_training.store).

A job computes the seeds of `further_training.shard_seeds` (default: all) for its block of the
left-out instances (`further_training.left_out_shard`). Each seed (or part) is written atomically
once complete, and a re-run skips those whose file exists and verifies, so an interrupted job
resumes where it stopped; identical jobs running at once share the work through per-seed locks.

Two estimators (`further_training.estimator`) write the same per-seed artifact: `difference`
trains the full-data run and one run per left-out instance (the stacked or the reference
engine); `derivative` differentiates the full-data run in each instance's loss weight
(tda.further_training.derivative, forward or reverse mode: `further_training.derivative_mode`)
and stores that first-order estimate of loss(D∖j) − loss(D) as `diff`.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from tda.artifacts import save_tensors
from tda.config import ConfigError, build
from tda.exits import DivergedError
from tda.further_training.derivative import WeightedTrajectory
from tda.further_training.engine import GroupTrainer, fit_runs
from tda.further_training.optim import optimizer_spec
from tda.further_training.progress import GoldProgress, quiet_lightning
from tda.further_training.reference import epoch_permutations, further_train_record, test_losses
from tda.further_training.stacked import build_stacked
from tda.further_training.store import GoldStandardSpec, seed_file, verified_seed, write_meta
from tda.memory import activation_numel
from tda.models.structure import linear_relu_stack, should_use_sparse
from tda.problem import AttributionProblem

log = logging.getLogger(__name__)


def with_batchnorm_momentum(model: torch.nn.Module, momentum: float | None) -> torch.nn.Module:
    """`further_training.batchnorm_momentum`: a copy of the model whose batch-norm layers update
    their running statistics with this momentum during further training (0: frozen; batch
    statistics still normalise in train mode); null: the model itself, unchanged."""
    if momentum is None:
        return model
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise ConfigError(f"further_training.batchnorm_momentum={momentum} is set but the model has no batch-norm "
                          f"layers; leave it null (the default)")
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = float(momentum)
    return model


def runs_per_group(model: torch.nn.Module, x: torch.Tensor, batch_size: int, dtype: torch.dtype, budget_mb: float,
                   sparse: bool) -> int:
    """How many runs fit in `budget_mb` at once: parameters, gradients, optimizer moments and
    temporaries (~8 copies) plus one batch of activations (forward, backward, temporaries)."""
    nbytes = torch.finfo(dtype).bits // 8
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    act = activation_numel(model, x[:1])
    per_run = n_params * nbytes * 8 + (batch_size + 1) * act * nbytes * 4
    if sparse:  # gathered / scattered first-layer rows
        first = next(p for p in model.parameters() if p.requires_grad)
        k = int((x[: min(len(x), 4096)] != 0).sum(1).max())
        per_run += (batch_size + 1) * k * first.shape[0] * nbytes * 3
    return max(1, int(budget_mb * 2 ** 20 // max(per_run, 1)))


def derivative_mode(requested: str, n_left_out: int, n_test: int) -> str:
    """`further_training.derivative_mode` resolved for a left-out block of `n_left_out` instances:
    forward mode costs grow with the number of instances carried (one tangent each), reverse
    mode's with the number of test instances (one adjoint each, every training instance at once),
    so `auto` takes reverse when the block is larger than the test set, else forward."""
    if requested in ("forward", "reverse"):
        return requested
    return "reverse" if n_left_out > n_test else "forward"


def torch_device(accelerator: str) -> torch.device:
    """The torch device of `trainer.accelerator` (Lightning's names: cpu, gpu / cuda, mps, auto)."""
    name = str(accelerator)
    if name in ("gpu", "cuda") or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    if name == "auto":
        return torch.device("cpu")
    return torch.device(name)


def training_tensors(problem: AttributionProblem, dtype: torch.dtype
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test) of `problem` as the runs train on them: floating-point
    inputs (not token ids) and regression targets in `dtype`."""
    x = problem.x_train.to(dtype) if problem.x_train.is_floating_point() else problem.x_train
    x_test = problem.x_test.to(dtype) if problem.x_test.is_floating_point() else problem.x_test
    y, y_test = problem.y_train, problem.y_test
    if problem.task == "regression":
        y, y_test = y.to(dtype), y_test.to(dtype)
    return x, y, x_test, y_test


def compute_seeds(gold_dir: Path, seeds: list[int], part: tuple[int, int] | None,
                  verified: Callable[[int, Path], bool], compute: Callable[[int, Path], None],
                  bar: GoldProgress) -> list[int]:
    """Compute each of `seeds` (its file for this `part`) that is not yet on disk: `verified(seed,
    path)` says whether its file exists and verifies (raising if it belongs elsewhere),
    `compute(seed, path)` writes it. A seed whose file verifies is taken without a write (no
    lock), so a complete gold standard is readable from read-only storage; any other is computed
    under its lock and checked again once the lock is held (another job may have just written
    it). Seeds another job is computing are left for last, then awaited (and computed if that
    job stopped). Returns the seeds done, sorted."""
    done, busy = [], []
    for seed in seeds:
        path = seed_file(gold_dir, seed, part)
        if not verified(seed, path):
            with seed_lock(gold_dir, seed, part, wait=False) as held:
                if not held:
                    log.info("seed %d is being computed by another job; moving on to the next seed", seed)
                    busy.append(seed)
                    continue
                if not verified(seed, path):
                    compute(seed, path)
        bar.seed_done(seed)
        done.append(seed)
    for seed in busy:
        path = seed_file(gold_dir, seed, part)
        log.info("waiting for the job that computes seed %d", seed)
        with seed_lock(gold_dir, seed, part, wait=True):
            if not verified(seed, path):
                compute(seed, path)  # that job stopped before finishing it
        bar.seed_done(seed)
        done.append(seed)
    return sorted(done)


@contextlib.contextmanager
def seed_lock(gold_dir: Path, seed: int, part: tuple[int, int] | None, wait: bool) -> Iterator[bool]:
    """An exclusive lock on one seed (or part (index, count) of it) of the gold standard in
    `gold_dir`, so identical jobs running at once never compute it twice. Yields whether it is
    held (with `wait=False`, False when another job holds it). The lock is a byte range of the
    gold directory's `.lock` file, one byte per seed file; the OS releases it when its holder dies."""
    offset = seed * 4096 + (part[0] + 1 if part is not None else 0)
    gold_dir.mkdir(parents=True, exist_ok=True)
    with open(gold_dir / ".lock", "a") as f:
        try:
            fcntl.lockf(f, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
        except (BlockingIOError, PermissionError):
            yield False
            return
        try:
            yield True
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN, 1, offset)


class FurtherTraining:
    """The gold standard of docs/method.md §2 for one final model: per seed, the full-data run and one run
    per left-out instance, each from the problem's model with a fresh optimizer; written per seed.
    The model is θᶠ, or for retraining (`start: initial_weights`) the final model's initial
    weights, which the stage puts in the problem (tda.stages.further_train).

    `spec`: the gold standard (its `further_training` settings and the fresh optimizer);
    `accelerator`: where the runs train (`trainer.accelerator`, Lightning's names)."""

    def __init__(self, spec: GoldStandardSpec, accelerator: str = "cpu"):
        self.spec, self.ft, self.accelerator = spec, spec.settings, str(accelerator)

    def run(self, problem: AttributionProblem, gold_dir: Path) -> list[int]:
        """Compute this job's seeds (and left-out shard) of `problem` into `gold_dir`; returns the
        seeds done (computed now or found complete on disk)."""
        ft = self.ft
        gold_dir = Path(gold_dir)
        dtype = getattr(torch, ft.dtype)
        model = with_batchnorm_momentum(problem.model.to(dtype), ft.batchnorm_momentum)
        x, y, x_test, y_test = training_tensors(problem, dtype)
        ft.checkpoint_steps(len(x))  # a schedule with no (or a misplaced) checkpoint is refused before any work
        opt_node = self.spec.further_optimizer
        engine = "derivative" if ft.estimator == "derivative" else ft.engine
        if engine in ("stacked", "derivative"):
            kind, hp = optimizer_spec(opt_node)  # SGD / Adam / AdamW, refused here otherwise
        left_out_all = problem.left_out_indices.tolist()
        index, count = ft.left_out_shard.index, ft.left_out_shard.count
        if count > len(left_out_all):
            raise ValueError(f"further_training.left_out_shard.count={count} exceeds the {len(left_out_all)} left-out "
                             f"instances; use at most {len(left_out_all)} shards")
        start, stop = ft.left_out_block(len(left_out_all))
        left_out = left_out_all[start:stop]
        part = (index, count) if count > 1 else None
        identity = self.spec.identity(problem.final_model_identity())
        write_meta(gold_dir, identity, problem.left_out_indices.tolist(), problem.test_indices.tolist(),
                   problem.n_train, ft.seeds)
        seeds = ft.job_seeds
        sparse = should_use_sparse(x.reshape(len(x), -1), ft.sparse_input) and linear_relu_stack(model) is not None
        group = ft.max_runs_per_group or runs_per_group(model, x, ft.batch_size, dtype, problem.memory_budget_mb,
                                                        sparse)
        if engine == "reference":
            group = 1  # one run at a time
        mode = derivative_mode(ft.derivative_mode, len(left_out), len(x_test))
        initial = test_losses(model, x_test, y_test, problem.task)

        def compute(seed: int, path: Path, bar: GoldProgress) -> None:
            t0 = time.perf_counter()
            perms = epoch_permutations(len(x), ft.epochs, seed)
            extra: dict[str, Any] = {}
            if engine == "derivative":
                full, diff, distance, extra = self._derivative_seed(model, (kind, hp), x, y, x_test, y_test,
                                                                    problem.task, seed, left_out, mode,
                                                                    problem.memory_budget_mb, bar)
                # the first-order losses of the runs without each instance pass the same check
                self._check_finite(seed, full, full.unsqueeze(-1) + diff, left_out, initial)
            else:
                if engine == "reference":
                    full, lo, distance = self._reference_seed(model, opt_node, x, y, x_test, y_test, problem.task,
                                                              seed, left_out, bar)
                else:
                    full, lo, distance = self._stacked_seed(model, kind, hp, x, y, x_test, y_test, problem.task, seed,
                                                            perms, left_out, group, dtype, bar)
                self._check_finite(seed, full, lo, left_out, initial)
                diff = lo - full.unsqueeze(-1)
            meta: dict[str, Any] = {**identity, "seed": seed, "seconds": time.perf_counter() - t0, "engine": engine,
                                    "left_out_block": [start, stop], "part": [index, count], **extra}
            save_tensors(path, {"diff": diff, "full_loss": full, "initial_loss": initial,
                                "distance_from_start": distance}, metadata=meta, what=f"gold-standard seed {seed}")
            log.info("further training seed %d (%s) -> %s in %.1fs", seed, engine, path.name, meta["seconds"])

        groups_per_seed = 1 if engine == "derivative" else -(-(1 + len(left_out)) // group)
        unit = {"reference": "run", "derivative": f"{mode} pass"}.get(engine, "group")
        with quiet_lightning(), GoldProgress(seeds, groups_per_seed, unit, enabled=ft.progress_bar) as bar:
            return compute_seeds(gold_dir, seeds, part,
                                 lambda seed, path: verified_seed(path, identity, seed, (index, count), (start, stop)),
                                 lambda seed, path: compute(seed, path, bar), bar)

    # A further-training run has diverged when its mean test loss leaves this range; see _check_finite.
    DIVERGENCE_FACTOR = 10.0
    DIVERGENCE_FLOOR = 1.0

    @staticmethod
    def _check_finite(seed: int, full: torch.Tensor, lo: torch.Tensor, left_out: list[int],
                      initial: torch.Tensor | None = None) -> None:
        """Diverged runs are never written (so never averaged in): name them and stop.

        full [T, n_test], lo [T, n_test, n_left_out]: test losses at each checkpoint;
        initial [n_test]: the final model's test losses. A run diverged when any of its test
        losses is NaN/inf, or when at any checkpoint its MEAN test loss (over the evaluated
        test instances) exceeds DIVERGENCE_FACTOR × the final model's mean test loss +
        DIVERGENCE_FLOOR (10 × mean + 1). The mean, not each instance: one test instance's
        loss may legitimately grow many-fold from near zero, while the mean is the scale of the
        loss the final model reached; further training from θᶠ perturbs it slightly (eq. 17
        measures differences of order 1/n), so a run at ten times that scale (and above the
        floor, ~the loss of guessing among e classes, which keeps a near-zero final loss from
        making the range tiny) is no longer measuring sensitivity: an lr far too large gives
        finite nonsense (test losses of 1e5 against 0.5) that would otherwise be averaged in.
        """
        bad_full = torch.tensor(not bool(torch.isfinite(full).all()))
        bad_lo = (~torch.isfinite(lo)).flatten(0, 1).any(0)  # [n_left_out]
        limit = None
        if initial is not None:
            limit = (FurtherTraining.DIVERGENCE_FACTOR * float(initial.double().mean())
                     + FurtherTraining.DIVERGENCE_FLOOR)
            bad_full |= (full.double().mean(-1) > limit).any()  # comparisons with NaN are False
            bad_lo |= (lo.double().mean(1) > limit).any(0)
        if bool(bad_full.any()) or bool(bad_lo.any()):
            which = [left_out[i] for i in bad_lo.nonzero().flatten().tolist()]
            parts = (["the full-data run"] if bool(bad_full.any()) else []) \
                + ([f"the runs leaving out training instances {which}"] if which else [])
            runs = torch.cat([full.unsqueeze(-1), lo], dim=-1).double()  # [T, n_test, 1 + n_left_out]
            why = "NaN/inf test loss" if not bool(torch.isfinite(runs).all()) else (
                f"mean test loss up to {float(runs.mean(1).max()):.4g}, above {limit:.4g} = "
                f"{FurtherTraining.DIVERGENCE_FACTOR:g} x the final model's mean test loss "
                f"{float(initial.double().mean()):.4g} + {FurtherTraining.DIVERGENCE_FLOOR:g}")
            raise DivergedError(f"further training diverged ({why}) for seed {seed}: {' and '.join(parts)}. "
                                     f"Nothing was written for this seed. Lower further_optimizer.lr or set "
                                     f"further_training.clip_grad_norm, then re-run (finished seeds are kept).")

    def _derivative_seed(self, model, optimizer, x, y, x_test, y_test, task, seed, left_out, mode: str,
                         memory_budget_mb: float, bar: GoldProgress):
        """The derivative estimator (tda.further_training.derivative) for one seed, along the
        full-data run: forward mode over the left-out block, or reverse mode over every training
        instance with the block's columns taken. Returns full [T, n_test], diff [T, n_test,
        n_left_out] (−Δw_j·∂ℓ_z/∂w_j: the first-order estimate of loss(D∖j) − loss(D) of the
        `mask` / `downweight` removal), the full run's distance from the start [T] and what to record
        in the seed file's header."""
        ft = self.ft
        bar.start(seed, 0)
        traj = WeightedTrajectory(model, optimizer, x, y, x_test, y_test, task, ft, seed,
                                  device=torch_device(self.accelerator))
        if mode == "forward":
            result = traj.forward_mode(left_out, memory_budget_mb)
            diff = result.derivative
        else:
            result = traj.reverse_mode(None, memory_budget_mb)
            diff = result.derivative[..., torch.as_tensor(left_out, dtype=torch.long)]
        bar.advance(seed)
        plan = {k: v for k, v in result.plan.items() if isinstance(v, (str, int, float, bool))}
        return (result.full_loss, diff.contiguous(), result.distance_from_start,
                {"derivative_mode": mode, "derivative_plan": plan})

    def _reference_seed(self, model, opt_node, x, y, x_test, y_test, task, seed, left_out, bar: GoldProgress):
        """The plain loop (tda.further_training.reference): one run after the other, the full run
        first. Returns full [T, n_test], lo [T, n_test, n_left_out], the full run's distance from
        the start [T]."""
        ft = self.ft
        optimizer = build(opt_node)
        kw = dict(optimizer=optimizer, x=x, y=y, x_test=x_test, y_test=y_test, task=task, n_epochs=ft.epochs,
                  seed=seed, batch_size=ft.batch_size, removal=ft.removal, epsilon=ft.epsilon,
                  clip_grad_norm=ft.clip_grad_norm, **ft.schedule)
        records = []
        for i, run in enumerate([None, *left_out]):
            bar.start(seed, i)
            records.append(further_train_record(model, left_out=run, **kw))
            bar.advance(seed)
        return (records[0].losses, torch.stack([r.losses for r in records[1:]], dim=-1),
                records[0].distance_from_start)

    def _stacked_seed(self, model, kind, hp, x, y, x_test, y_test, task, seed, perms, left_out, group, dtype,
                      bar: GoldProgress):
        """All runs of the seed in groups of at most `group` runs (the full run in the first).
        Returns full [T, n_test], lo [T, n_test, n_left_out], the full run's distance from the
        start [T]."""
        ft = self.ft
        runs: list[int | None] = [None, *left_out]
        out, distance = [], None
        for g, g0 in enumerate(range(0, len(runs), group)):
            bar.start(seed, g)
            chunk = runs[g0:g0 + group]
            is_full = torch.tensor([r is None for r in chunk])
            lo = torch.tensor([-1 if r is None else r for r in chunk])
            stacked = build_stacked(model, len(chunk), x, y, task, fast_path=True, sparse_input=ft.sparse_input,
                                    vmap=ft.vmap, device=self.accelerator)
            gt = GroupTrainer(stacked, kind, hp, perms, lo, is_full, ft.batch_size, ft.removal, seed, x_test,
                              y_test, epsilon=ft.epsilon, clip_grad_norm=ft.clip_grad_norm, **ft.schedule)
            fit_runs(gt, ft.epochs, self.accelerator, dtype)
            out.append(gt.result())  # [T, n_test, r]
            if g == 0:
                distance = gt.distance_from_start()
            bar.advance(seed)
        losses = torch.cat(out, dim=-1)
        return losses[..., 0], losses[..., 1:], distance
