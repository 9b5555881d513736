"""Running the gold standard seed by seed, and reading it back.

On disk (`runs/<run>/gold/<key>/`):
  meta.json                      settings, checkpoints, left-out and test indices
  seed_00000.safetensors ...     one file per seed, written atomically when the seed completes:
      diff          [n_checkpoints, n_test, n_left_out]  float64, loss(D∖j) − loss(D)   (eq. 17)
      full_loss     [n_checkpoints, n_test]              float64, the full-data run
      initial_loss  [n_test]                             float64, at θᶠ
A re-run skips seeds whose file exists, so an interrupted job resumes where it stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from tqdm.auto import tqdm

from tda.artifacts import load_json, load_tensors, save_json, save_tensors
from tda.config import to_container
from tda.further_training.simple import epoch_permutations, further_train_run, test_losses
from tda.methods.base import AttributionProblem

REMOVAL_MODES = ("drop", "downweight", "mask")


def seed_file(gold_dir: Path, seed: int) -> Path:
    return gold_dir / f"seed_{seed:05d}.safetensors"


def seeds_of(ft: DictConfig) -> list[int]:
    return [int(ft.seed_offset) + i for i in range(int(ft.n_seeds))]


def validate_further_training(ft: DictConfig) -> None:
    if ft.removal not in REMOVAL_MODES:
        raise ValueError(f"further_training.removal={ft.removal!r} is not one of {REMOVAL_MODES}")
    if int(ft.n_seeds) <= 0:
        raise ValueError(f"further_training.n_seeds must be positive, got {ft.n_seeds}")
    if int(ft.epochs) <= 0:
        raise ValueError(f"further_training.epochs must be positive, got {ft.epochs}")
    if ft.dtype not in ("float32", "float64"):
        raise ValueError(f"further_training.dtype must be float32 or float64, got {ft.dtype!r}")


class FurtherTraining:
    """`method=further_training`: the gold standard of SPEC §2, written per seed."""

    name = "further_training"

    def run(self, problem: AttributionProblem, gold_dir: Path) -> list[int]:
        ft, opt_cfg = problem.further_training, problem.further_optimizer
        validate_further_training(ft)
        dtype = getattr(torch, ft.dtype)
        model = problem.model.to(dtype)
        x = problem.x_train.to(dtype) if problem.x_train.is_floating_point() else problem.x_train
        x_test = problem.x_test.to(dtype) if problem.x_test.is_floating_point() else problem.x_test
        y, y_test = problem.y_train, problem.y_test
        if problem.task == "regression":
            y, y_test = y.to(dtype), y_test.to(dtype)
        optimizer = instantiate({k: v for k, v in to_container(opt_cfg).items() if k != "name"})
        left_out = problem.left_out_indices.tolist()
        self._write_meta(problem, gold_dir)
        done = []
        initial = test_losses(model, x_test, y_test, problem.task)
        for seed in tqdm(seeds_of(ft), desc="further training (seeds)"):
            path = seed_file(gold_dir, seed)
            if path.is_file():
                done.append(seed)
                continue
            t0 = time.perf_counter()
            perms = epoch_permutations(len(x), int(ft.epochs), seed)
            kw = dict(optimizer=optimizer, x=x, y=y, x_test=x_test, y_test=y_test, task=problem.task, perms=perms,
                      batch_size=int(ft.batch_size), removal=ft.removal, checkpoint_every=ft.checkpoint_every_steps,
                      epsilon=ft.epsilon, clip_grad_norm=ft.clip_grad_norm, dropout_seed=seed)
            full = further_train_run(model, left_out=None, **kw)
            lo = torch.stack([further_train_run(model, left_out=j, **kw) for j in tqdm(left_out, leave=False, desc=f"seed {seed}")], dim=-1)
            diff = lo - full.unsqueeze(-1)
            if not torch.isfinite(diff).all():
                raise FloatingPointError(f"further training diverged (NaN/inf loss) for seed {seed}; lower the learning rate")
            save_tensors(path, {"diff": diff, "full_loss": full, "initial_loss": initial},
                         metadata={"seed": seed, "seconds": time.perf_counter() - t0})
            done.append(seed)
        return done

    def _write_meta(self, problem: AttributionProblem, gold_dir: Path) -> None:
        ft = problem.further_training
        meta = {"further_training": to_container(ft), "further_optimizer": to_container(problem.further_optimizer),
                "left_out_indices": problem.left_out_indices.tolist(), "test_indices": problem.test_indices.tolist(),
                "n_train": problem.n_train, "seeds": seeds_of(ft)}
        path = gold_dir / "meta.json"
        if path.is_file():
            old = load_json(path)
            for k in ("left_out_indices", "test_indices", "n_train"):
                if old.get(k) != meta[k]:
                    raise ValueError(f"{path} was written for different {k}; it cannot be combined with this run. "
                                     f"Delete {gold_dir} or restore the original selection.")
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
        checkpoint and seed."""
        return postprocess(self.diff, self.full_loss, self.initial_loss, center=center, adjust=adjust, seeds=seeds)


def postprocess(diff: torch.Tensor, full_loss: torch.Tensor, initial_loss: torch.Tensor, center: bool = True,
                adjust: bool = True, seeds: slice | list[int] | None = None) -> torch.Tensor:
    """diff [T, n_test, n_left_out, S] -> attribution [T, n_test, n_left_out]."""
    if seeds is not None:
        diff, full_loss = diff[..., seeds], full_loss[..., seeds]
    a = diff if adjust else diff + (full_loss - initial_loss[None, :, None]).unsqueeze(2)
    if center:
        a = a - a.mean(dim=2, keepdim=True)
    return a.mean(dim=-1)


def load_gold_standard(gold_dir: Path, require_all: bool = True) -> GoldStandard:
    meta_path = gold_dir / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"no gold standard in {gold_dir}; run `python attribute.py method=further_training` "
                                f"with the same overrides first")
    meta = load_json(meta_path)
    present = [s for s in meta["seeds"] if seed_file(gold_dir, s).is_file()]
    missing = sorted(set(meta["seeds"]) - set(present))
    if not present or (require_all and missing):
        raise FileNotFoundError(f"gold standard in {gold_dir} is incomplete: seeds {missing} are missing; "
                                f"re-run `python attribute.py method=further_training` with the same overrides to finish them")
    parts = [load_tensors(seed_file(gold_dir, s)) for s in present]
    return GoldStandard(diff=torch.stack([p["diff"] for p in parts], dim=-1),
                        full_loss=torch.stack([p["full_loss"] for p in parts], dim=-1),
                        initial_loss=parts[0]["initial_loss"], seeds=present, meta=meta)
