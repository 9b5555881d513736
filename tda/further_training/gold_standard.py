"""Running the gold standard seed by seed, and reading it back.

On disk (`runs/<run>/gold/<key>/`):
  meta.json                      settings, checkpoints, left-out and test indices
  seed_00000.safetensors ...     one file per seed, written atomically when the seed completes:
      diff          [n_checkpoints, n_test, n_left_out]  float64, loss(D∖j) − loss(D)   (eq. 17)
      full_loss     [n_checkpoints, n_test]              float64, the full-data run
      initial_loss  [n_test]                             float64, at θᶠ
  seed_00000.part_01_of_04.safetensors ...
                                 the same for a contiguous block of the left-out instances
                                 (`further_training.left_out_shard`); `diff` is
                                 [n_checkpoints, n_test, block size]; the files' metadata
                                 names the block.
A re-run skips seeds (or parts) whose file exists, so an interrupted job resumes where it
stopped; jobs given different `shard_seeds` / `left_out_shard` fill the same directory and
:func:`load_gold_standard` merges them, naming any seed or part that is missing or doubled.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import logging
import re
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from tda.artifacts import IntegrityError, load_json, load_tensors_with_metadata, save_json, save_tensors
from tda.config import build, to_container
from tda.further_training import gold_settings
from tda.further_training.engine import FurtherTrainingModule, GroupTrainer
from tda.further_training.optim import optimizer_spec
from tda.further_training.reference import epoch_permutations, further_train_run, test_losses
from tda.further_training.stacked import build_stacked
from tda.memory import activation_numel
from tda.models.structure import mlp_layers, should_use_sparse
from tda.problem import AttributionProblem
from tda.provenance import ProvenanceError, require_match

log = logging.getLogger(__name__)

REMOVAL_MODES = ("drop", "downweight", "mask")
ENGINES = ("stacked", "reference")
_PART = re.compile(r"^seed_(\d+)\.part_(\d+)_of_(\d+)\.safetensors$")


def seed_file(gold_dir: Path, seed: int, part: tuple[int, int] | None = None) -> Path:
    """The file of one seed; `part` = (index, count) of a left-out shard, count > 1."""
    if part is None or part[1] == 1:
        return gold_dir / f"seed_{seed:05d}.safetensors"
    return gold_dir / f"seed_{seed:05d}.part_{part[0] + 1:02d}_of_{part[1]:02d}.safetensors"


def seeds_of(ft: DictConfig) -> list[int]:
    return [int(ft.seed_offset) + i for i in range(int(ft.n_seeds))]


def shard_block(n_left_out: int, index: int, count: int) -> tuple[int, int]:
    """[start, stop) of left-out shard `index` of `count`: contiguous, sizes differ by at most one."""
    return index * n_left_out // count, (index + 1) * n_left_out // count


def _shard(ft: DictConfig) -> tuple[int, int]:
    s = ft.get("left_out_shard")
    if s is None:
        return 0, 1
    return int(s.get("index", 0)), int(s.get("count", 1))


def validate_further_training(ft: DictConfig) -> None:
    if ft.removal not in REMOVAL_MODES:
        raise ValueError(f"further_training.removal={ft.removal!r} is not one of {REMOVAL_MODES}")
    if int(ft.n_seeds) <= 0:
        raise ValueError(f"further_training.n_seeds must be positive, got {ft.n_seeds}")
    if int(ft.epochs) <= 0:
        raise ValueError(f"further_training.epochs must be positive, got {ft.epochs}")
    if ft.dtype not in ("float32", "float64"):
        raise ValueError(f"further_training.dtype must be float32 or float64, got {ft.dtype!r}")
    if ft.get("engine", "stacked") not in ENGINES:
        raise ValueError(f"further_training.engine={ft.engine!r} is not one of {ENGINES}")
    index, count = _shard(ft)
    if not (count >= 1 and 0 <= index < count):
        raise ValueError(f"further_training.left_out_shard={{index: {index}, count: {count}}}: index must be in 0..count-1")
    bn = ft.get("batchnorm_momentum")
    if bn is not None and not 0.0 <= float(bn) <= 1.0:
        raise ValueError(f"further_training.batchnorm_momentum={bn} must be in [0, 1] (0 freezes the running "
                         f"statistics) or null (the model's own momentum)")
    shard_seeds = ft.get("shard_seeds")
    if shard_seeds is not None:
        outside = sorted(set(int(s) for s in shard_seeds) - set(seeds_of(ft)))
        if outside:
            raise ValueError(f"further_training.shard_seeds contains {outside}, which are not seeds of this gold standard "
                             f"({ft.seed_offset}..{int(ft.seed_offset) + int(ft.n_seeds) - 1})")


def with_batchnorm_momentum(model: torch.nn.Module, momentum: float | None) -> torch.nn.Module:
    """`further_training.batchnorm_momentum`: a copy of the model whose batch-norm layers update
    their running statistics with this momentum during further training (0: frozen; batch
    statistics still normalise in train mode); null: the model itself, unchanged."""
    if momentum is None:
        return model
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise ValueError(f"further_training.batchnorm_momentum={momentum} is set but the model has no batch-norm "
                         f"layers; leave it null")
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


class FurtherTraining:
    """`method=further_training`: the gold standard of SPEC §2, written per seed."""

    name = "further_training"

    def run(self, problem: AttributionProblem, gold_dir: Path, trainer: DictConfig | dict | None = None) -> list[int]:
        """Compute this job's seeds (and left-out shard) into `gold_dir`; returns the seeds done.
        `trainer`: the `trainer` config node (accelerator, devices, progress_bar) for Lightning."""
        ft, opt_cfg = problem.further_training, problem.further_optimizer
        validate_further_training(ft)
        gold_dir = Path(gold_dir)
        dtype = getattr(torch, ft.dtype)
        model = with_batchnorm_momentum(problem.model.to(dtype), ft.get("batchnorm_momentum"))
        x = problem.x_train.to(dtype) if problem.x_train.is_floating_point() else problem.x_train
        x_test = problem.x_test.to(dtype) if problem.x_test.is_floating_point() else problem.x_test
        y, y_test = problem.y_train, problem.y_test
        if problem.task == "regression":
            y, y_test = y.to(dtype), y_test.to(dtype)
        opt_node = to_container(opt_cfg)
        engine = ft.get("engine", "stacked")
        if engine == "stacked":
            kind, hp = optimizer_spec(opt_node)
        left_out_all = problem.left_out_indices.tolist()
        index, count = _shard(ft)
        if count > len(left_out_all):
            raise ValueError(f"further_training.left_out_shard.count={count} exceeds the {len(left_out_all)} left-out "
                             f"instances; use at most {len(left_out_all)} shards")
        start, stop = shard_block(len(left_out_all), index, count)
        left_out = left_out_all[start:stop]
        part = (index, count) if count > 1 else None
        self._write_meta(problem, gold_dir)
        shard_seeds = ft.get("shard_seeds")
        seeds = seeds_of(ft) if shard_seeds is None else [int(s) for s in shard_seeds]
        sparse = should_use_sparse(x.reshape(len(x), -1), ft.get("sparse_input", "auto")) and mlp_layers(model) is not None
        every, steps = ft.get("checkpoint_every_steps"), int(ft.epochs) * -(-len(x) // int(ft.batch_size))
        if every and int(every) > steps:
            raise ValueError(f"further_training.checkpoint_every_steps={every} exceeds the {steps} steps of further "
                             f"training ({ft.epochs} epochs of {-(-len(x) // int(ft.batch_size))}), so no checkpoint "
                             f"would be recorded; lower it or set it to null (a checkpoint after every epoch)")
        group = ft.get("max_runs_per_group")
        group = int(group) if group else runs_per_group(model, x, int(ft.batch_size), dtype, problem.memory_budget_mb, sparse)
        trainer_cfg = dict(to_container(trainer)) if trainer is not None else {}
        progress = bool(ft.get("progress_bar", trainer_cfg.get("progress_bar", True)))
        initial = test_losses(model, x_test, y_test, problem.task)
        identity = gold_identity(problem)

        def compute(seed: int, path: Path) -> None:
            t0 = time.perf_counter()
            perms = epoch_permutations(len(x), int(ft.epochs), seed)
            if engine == "reference":
                full, lo = self._reference_seed(model, opt_node, x, y, x_test, y_test, problem.task, ft, seed, left_out)
            else:
                full, lo = self._stacked_seed(model, kind, hp, x, y, x_test, y_test, problem.task, ft, seed, perms,
                                              left_out, group, trainer_cfg, progress, dtype)
            self._check_finite(seed, full, lo, left_out, initial)
            diff = lo - full.unsqueeze(-1)
            meta: dict[str, Any] = {**identity, "seed": seed, "seconds": time.perf_counter() - t0, "engine": engine,
                                    "left_out_block": [start, stop], "part": [index, count]}
            save_tensors(path, {"diff": diff, "full_loss": full, "initial_loss": initial}, metadata=meta,
                         what=f"gold-standard seed {seed}")
            log.info("further training seed %d (%s) -> %s in %.1fs", seed, engine, path.name, meta["seconds"])

        done, busy = [], []
        for seed in seeds:  # seeds another job is computing are left for last, then awaited
            path = seed_file(gold_dir, seed, part)
            with seed_lock(path, wait=False) as held:
                if not held:
                    log.info("seed %d is being computed by another job; moving on to the next seed", seed)
                    busy.append(seed)
                    continue
                if not _verified_seed(path, identity, seed, (index, count), (start, stop)):
                    compute(seed, path)
            done.append(seed)
        for seed in busy:
            path = seed_file(gold_dir, seed, part)
            log.info("waiting for the job that computes seed %d", seed)
            with seed_lock(path, wait=True):
                if not _verified_seed(path, identity, seed, (index, count), (start, stop)):
                    compute(seed, path)  # that job stopped before finishing it
            done.append(seed)
        return sorted(done)

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
            limit = FurtherTraining.DIVERGENCE_FACTOR * float(initial.double().mean()) + FurtherTraining.DIVERGENCE_FLOOR
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
            raise FloatingPointError(f"further training diverged ({why}) for seed {seed}: {' and '.join(parts)}. "
                                     f"Nothing was written for this seed. Lower further_optimizer.lr or set "
                                     f"further_training.clip_grad_norm, then re-run (finished seeds are kept).")

    def _reference_seed(self, model, opt_node, x, y, x_test, y_test, task, ft, seed, left_out):
        optimizer = build(opt_node)
        kw = dict(optimizer=optimizer, x=x, y=y, x_test=x_test, y_test=y_test, task=task, n_epochs=int(ft.epochs),
                  seed=seed, batch_size=int(ft.batch_size), removal=ft.removal, checkpoint_every=ft.checkpoint_every_steps,
                  epsilon=ft.epsilon, clip_grad_norm=ft.clip_grad_norm)
        full = further_train_run(model, left_out=None, **kw)
        lo = torch.stack([further_train_run(model, left_out=j, **kw) for j in left_out], dim=-1)
        return full, lo

    def _stacked_seed(self, model, kind, hp, x, y, x_test, y_test, task, ft, seed, perms, left_out, group,
                      trainer_cfg, progress, dtype):
        """All runs of the seed in groups of at most `group` runs (the full run in the first)."""
        runs: list[int | None] = [None, *left_out]
        out = []
        for g0 in range(0, len(runs), group):
            chunk = runs[g0:g0 + group]
            is_full = torch.tensor([r is None for r in chunk])
            lo = torch.tensor([-1 if r is None else r for r in chunk])
            stacked = build_stacked(model, len(chunk), x, y, task, fast_path=True, sparse_input=ft.get("sparse_input", "auto"),
                                    vmap=ft.get("vmap", "auto"), device=trainer_cfg.get("accelerator", "cpu"))
            gt = GroupTrainer(stacked, kind, hp, perms, lo, is_full, int(ft.batch_size), ft.removal, seed, x_test, y_test,
                              epsilon=ft.epsilon, clip_grad_norm=ft.clip_grad_norm, checkpoint_every=ft.checkpoint_every_steps)
            self._fit(gt, int(ft.epochs), trainer_cfg, progress, dtype)
            out.append(gt.result())  # [T, n_test, r]
        losses = torch.cat(out, dim=-1)
        return losses[..., 0], losses[..., 1:]

    @staticmethod
    def _fit(gt: GroupTrainer, epochs: int, trainer_cfg: dict, progress: bool, dtype: torch.dtype) -> None:
        import lightning as L

        accelerator = trainer_cfg.get("accelerator", "cpu")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(configure_optimizers|num_workers|does not have many workers"
                                                      "|GPU available|TPU available|LOCAL_RANK).*")
            trainer = L.Trainer(max_epochs=epochs, accelerator=accelerator, devices=1,
                                precision="64-true" if dtype == torch.float64 else "32-true", logger=False,
                                enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=progress,
                                num_sanity_val_steps=0, limit_val_batches=0)
            trainer.fit(FurtherTrainingModule(gt))
        expected = (epochs * gt.steps_per_epoch // int(gt.checkpoint_every)) if gt.checkpoint_every else epochs
        if trainer.interrupted or len(gt.losses) != expected:
            # never write a seed whose runs did not finish (Lightning swallows some interruptions)
            raise RuntimeError(f"further training of seed {gt.seed} stopped early ({len(gt.losses)} of {expected} "
                               f"checkpoints); nothing was written for it. Re-run the same command to resume.")

    def _write_meta(self, problem: AttributionProblem, gold_dir: Path) -> None:
        """meta.json: what the gold standard in `gold_dir` is (identity, indices, seeds). An
        existing one written for another final model, settings or selection is refused."""
        ft = problem.further_training
        meta = {**gold_identity(problem), "left_out_indices": problem.left_out_indices.tolist(),
                "test_indices": problem.test_indices.tolist(), "n_train": problem.n_train, "seeds": seeds_of(ft)}
        path = gold_dir / "meta.json"
        if path.is_file():
            old = load_json(path)
            require_match(old, {k: v for k, v in meta.items() if k != "seeds"}, f"the gold standard in {gold_dir}",
                          f"Delete {gold_dir} (or move it away) and re-run this command to compute it for this model.")
            if sorted(set(old["seeds"]) | set(meta["seeds"])) == old["seeds"]:
                return  # shards running at the same time all find it already written
            meta["seeds"] = sorted(set(old["seeds"]) | set(meta["seeds"]))
        save_json(path, meta)


@dataclass
class GoldStandard:
    """All completed seeds of a gold standard.

    diff [n_checkpoints, n_test, n_left_out, n_seeds], full_loss [n_checkpoints, n_test, n_seeds],
    initial_loss [n_test]."""

    diff: torch.Tensor
    full_loss: torch.Tensor
    initial_loss: torch.Tensor
    seeds: list[int]
    meta: dict
    files: dict[str, str] = field(default_factory=dict)  # file name -> checksum of every file merged

    @property
    def n_checkpoints(self) -> int:
        return self.diff.shape[0]

    def checkpoint_axis(self) -> tuple[str, list[float]]:
        """Name and values of the x axis: further-training epochs, or steps when
        checkpoints are every k steps."""
        ft = self.meta["further_training"]
        k = ft.get("checkpoint_every_steps")
        if k:
            return "step", [float(k * (i + 1)) for i in range(self.n_checkpoints)]
        return "epoch", [float(i + 1) for i in range(self.n_checkpoints)]

    def attribution(self, center: bool = True, adjust: bool = True, seeds: slice | list[int] | None = None) -> torch.Tensor:
        """a_t(j, z) of SPEC §2 averaged over seeds: [n_checkpoints, n_test, n_left_out].

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
        a = a - a.mean(dim=2, keepdim=True)
    return a.mean(dim=-1)


# ---------------------------------------------------------------------------------- identity and locks
def gold_identity(problem: AttributionProblem) -> dict[str, Any]:
    """What a gold standard is computed from: the final model's identity (tda.provenance) and
    the settings that define it. Recorded in meta.json and in every seed file's header."""
    return {"final_model": problem.final_model_identity(), "further_training": gold_settings(problem.further_training),
            "further_optimizer": to_container(problem.further_optimizer)}


def expected_gold(final_model: dict[str, str], selection: dict, ft: DictConfig, further_optimizer: DictConfig) -> dict:
    """What the gold standard of a config must be (for :func:`load_gold_standard`'s `expected`)."""
    return {"final_model": final_model, "further_training": gold_settings(ft),
            "further_optimizer": to_container(further_optimizer),
            "left_out_indices": selection["left_out_indices"], "test_indices": selection["test_indices"]}


def _check_seed_header(path: Path, header: dict, identity: dict, seed: int, part: tuple[int, int],
                       block: tuple[int, int]) -> None:
    """A seed file is what its name and its gold standard say: same identity, seed, part, block."""
    fix = f"Delete {path} and re-run `python attribute.py method=further_training <same overrides>` to recompute it."
    require_match(header, identity, f"the gold-standard file {path}", fix)
    require_match(header, {"seed": seed, "part": list(part), "left_out_block": list(block)},
                  f"the gold-standard file {path} (its header names another seed or part than its file name: "
                  f"copied or renamed?)", fix)


def _verified_seed(path: Path, identity: dict, seed: int, part: tuple[int, int], block: tuple[int, int]) -> bool:
    """Whether the seed's file exists, verifies, and belongs to this gold standard (raises if it
    exists but does not: it is never silently recomputed over, nor reused)."""
    if not path.is_file():
        return False
    _, header, _ = load_tensors_with_metadata(path)
    _check_seed_header(path, header, identity, seed, part, block)
    return True


@contextlib.contextmanager
def seed_lock(path: Path, wait: bool) -> Iterator[bool]:
    """An exclusive lock on one seed (or part) of a gold standard, so identical jobs running at
    once never compute it twice. Yields whether it is held (with `wait=False`, False when
    another job holds it). The lock is a byte range of the gold directory's `.lock` file,
    one byte per seed file; the OS releases it when its holder dies."""
    m = _PART.match(path.name)
    seed, part = (int(m.group(1)), int(m.group(2))) if m else (int(re.match(r"seed_(\d+)", path.name).group(1)), 0)
    offset = seed * 4096 + part
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".lock", "a") as f:
        try:
            fcntl.lockf(f, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
        except (BlockingIOError, PermissionError):
            yield False
            return
        try:
            yield True
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN, 1, offset)


# ---------------------------------------------------------------------------------- reading back
def _seed_files(gold_dir: Path, seed: int) -> dict[tuple[int, int], Path]:
    """{(part index, count): file} of one seed by file name; a whole-seed file is (0, 1)."""
    found: dict[tuple[int, int], Path] = {}
    for p in gold_dir.glob(f"seed_{seed:05d}*.safetensors"):
        m = _PART.match(p.name)
        if m and int(m.group(1)) == seed:
            found[(int(m.group(2)) - 1, int(m.group(3)))] = p
        elif p.name == f"seed_{seed:05d}.safetensors":
            found[(0, 1)] = p
    return found


def _merge_seed(seed: int, parts_found: dict[tuple[int, int], Path], identity: dict, n_left_out: int,
                files: dict[str, str]) -> tuple[dict | None, str | None, str | None]:
    """(tensors, missing message, duplicate message) for one seed's files, each verified and
    checked against its own header (identity, seed, part, left-out block); `files` collects
    each file's checksum."""
    counts = sorted({c for _, c in parts_found})
    if len(counts) > 1:
        names = sorted(p.name for p in parts_found.values())
        return None, None, (f"seed {seed} has files of different shardings {names}; keep one sharding "
                            f"(delete the others) and re-run the missing parts")
    count = counts[0]
    have = sorted(i for i, _ in parts_found)
    missing = [i for i in range(count) if i not in have]
    if missing:
        return None, f"seed {seed}: parts {[i + 1 for i in missing]} of {count}", None
    parts = []
    for i in range(count):
        path = parts_found[(i, count)]
        tensors, header, checksum = load_tensors_with_metadata(path)
        files[path.name] = checksum
        block = shard_block(n_left_out, i, count)
        _check_seed_header(path, header, identity, seed, (i, count), block)
        if tensors["diff"].shape[-1] != block[1] - block[0]:
            return None, None, (f"{path.name} holds {tensors['diff'].shape[-1]} left-out instances, expected "
                                f"{block[1] - block[0]}; delete it and re-run")
        parts.append(tensors)
    full = parts[0]["full_loss"]
    for i, p in enumerate(parts[1:], 2):
        if not torch.allclose(p["full_loss"], full, rtol=0, atol=1e-6 * (1 + float(full.abs().max()))):
            return None, None, (f"seed {seed}: part {i} of {count} has a different full-data run than part 1 "
                                f"(written with other settings?); delete the seed's files and re-run it")
    return {"diff": torch.cat([p["diff"] for p in parts], dim=-1), "full_loss": full,
            "initial_loss": parts[0]["initial_loss"]}, None, None


def load_gold_standard(gold_dir: Path, expected: dict | None = None, seeds: list[int] | None = None,
                       require_all: bool = True) -> GoldStandard:
    """Merge the per-seed (and per-part) files of a gold standard.

    Every file is verified (checksum) and must carry the identity recorded in meta.json and the
    seed / part its name says. `expected` (see :func:`expected_gold`) is what the current config
    and final model need: meta.json must match it. `seeds`: the seeds to merge (the config's;
    default: those meta.json lists). Raises naming every seed or part that is missing (with
    `require_all`), doubled (files of two shardings for one seed) or foreign."""
    gold_dir = Path(gold_dir)
    meta_path = gold_dir / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"no gold standard in {gold_dir}; run `python attribute.py method=further_training` "
                                f"with the same overrides first")
    meta = load_json(meta_path)
    fix = f"Delete {gold_dir} and re-run `python attribute.py method=further_training <same overrides>`."
    lacking = [k for k in ("final_model", "further_training", "further_optimizer", "left_out_indices", "test_indices",
                           "seeds") if k not in meta]
    if lacking:
        raise ProvenanceError(f"{meta_path} does not record {lacking}, so what the gold standard was computed from "
                              f"cannot be checked. {fix}")
    if expected is not None:
        require_match(meta, expected, f"the gold standard in {gold_dir}", fix)
    identity = {k: meta[k] for k in ("final_model", "further_training", "further_optimizer")}
    n_left_out = len(meta["left_out_indices"])
    seeds = list(meta["seeds"]) if seeds is None else [int(s) for s in seeds]
    merged, missing, duplicated, checksums = {}, [], [], {}
    for s in seeds:
        found = _seed_files(gold_dir, s)
        if not found:
            missing.append(f"seed {s}")
            continue
        tensors, miss, dup = _merge_seed(s, found, identity, n_left_out, checksums)
        if dup:
            duplicated.append(dup)
        elif miss:
            missing.append(miss)
        else:
            merged[s] = tensors
    if duplicated:
        raise ValueError(f"gold standard in {gold_dir} has conflicting files:\n  - " + "\n  - ".join(duplicated))
    if not merged or (require_all and missing):
        raise FileNotFoundError(f"gold standard in {gold_dir} is incomplete: missing {'; '.join(missing)}. "
                                f"Re-run `python attribute.py method=further_training` with the same overrides "
                                f"(and the same further_training.left_out_shard for missing parts) to finish them")
    present = [s for s in seeds if s in merged]
    return GoldStandard(diff=torch.stack([merged[s]["diff"] for s in present], dim=-1),
                        full_loss=torch.stack([merged[s]["full_loss"] for s in present], dim=-1),
                        initial_loss=merged[present[0]]["initial_loss"], seeds=present, meta=meta,
                        files={name: c for name, c in sorted(checksums.items())
                               if any(name.startswith(f"seed_{s:05d}") for s in present)})


def gold_status(gold_dir: Path, expected: dict, seeds: list[int], complete: bool) -> str:
    """After a further-training job: merge what is on disk. `complete` (an unsharded job)
    requires every seed; a shard reports what the other jobs still have to deliver."""
    try:
        gold = load_gold_standard(gold_dir, expected, seeds, require_all=True)
    except (FileNotFoundError, ValueError) as err:
        # a shard's own files are written and verified; what other jobs still owe (or wrote
        # twice) is for the merge in the evaluate stage to refuse
        if complete or isinstance(err, (ProvenanceError, IntegrityError)):
            raise
        return f"this shard is done; the gold standard cannot be merged yet: {err}"
    return f"gold standard complete: {len(gold.seeds)} seeds, diff {list(gold.diff.shape)}"
