"""The gold standard's self-effect (docs/further_training.md, "The self-effect"): the further-training
attribution of every training instance for its own loss,

    a_t(i, z_i) ≈ loss(z_i, θ_t(D∖i)) − loss(z_i, θ_t(D)),

in the first-order form of the derivative estimator (tda.further_training.derivative): the
gold-standard counterpart of a method's self-influence, which mislabel detection ranks like any
other (`tda-further-train further_training.estimator=derivative further_training.removal=mask
attribution.target=self`).

For each block J of training rows the full-data run of a seed is differentiated with J as its
test set, and of the derivatives [T, |J|, ·] only each instance's entry for itself is kept, so no
n_train × n_train matrix is held. Forward mode carries one tangent per instance of J and yields every
checkpoint at once; reverse mode carries one adjoint per (checkpoint, instance of J), T times as
many, so `derivative_mode=auto` takes forward mode here.

On disk (`self_influence/gold-<gold key>/`, tda.runs.RunDir.self_influence_dir):
  seed_00000.safetensors ...  one per seed, written when the seed completes (a re-run resumes):
      self_effect   [n_checkpoints, n_train]  float64, a_t(i, z_i)
      full_loss     [n_checkpoints, n_train]  float64, each instance's loss along the full-data run
      initial_loss  [n_train]                 float64, at the start (θᶠ)
  scores.safetensors, record.json   once every seed is there: the mean over the seeds at the last
                                    checkpoint [n_train], in tda.scores' format (what the
                                    evaluation reads, as it reads a method's self-influence)
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from tda.artifacts import load_tensors_with_metadata, save_tensors
from tda.config import ConfigError
from tda.exits import DivergedError
from tda.further_training.derivative import WeightedTrajectory
from tda.further_training.gold_standard import FurtherTraining, seed_lock, torch_device, with_batchnorm_momentum
from tda.further_training.optim import optimizer_spec
from tda.further_training.store import GoldStandardSpec, seed_file
from tda.problem import AttributionProblem
from tda.provenance import require_match
from tda.scores import save_method_scores, scores_complete

log = logging.getLogger(__name__)

COMMAND = ("tda-further-train further_training.estimator=derivative further_training.removal=mask "
           "attribution.target=self")


def self_effect_key(spec: GoldStandardSpec) -> str:
    """The directory name of a gold standard's self-effect: `gold-<its key>`."""
    return f"gold-{spec.key}"


def self_effect_mode(requested: str) -> str:
    """`further_training.derivative_mode` for the self-effect: forward unless reverse is asked for
    (forward carries n_train tangents for every checkpoint at once, reverse n_train adjoints per
    checkpoint)."""
    return "reverse" if requested == "reverse" else "forward"


class SelfEffect:
    """The self-effect of every training instance for one final model and gold standard `spec`
    (its further-training settings and fresh optimizer), seed by seed; `accelerator`: where the
    runs train (`trainer.accelerator`)."""

    def __init__(self, spec: GoldStandardSpec, accelerator: str = "cpu"):
        self.spec, self.ft, self.accelerator = spec, spec.settings, str(accelerator)
        problems = []
        if self.ft.estimator != "derivative":
            problems.append(f"the self-effect of every training instance is computed by the derivative estimator (one "
                            f"pass carries every instance), not further_training.estimator={self.ft.estimator}; "
                            f"set further_training.estimator=derivative (with removal mask or downweight)")
        if self.ft.left_out_shard.count > 1:
            problems.append("further_training.left_out_shard splits the left-out instances; the self-effect covers "
                            "every training instance: leave left_out_shard at its default (shard by "
                            "further_training.shard_seeds instead)")
        if problems:
            raise ConfigError.listing("attribution.target=self for the gold standard", problems)

    def run(self, problem: AttributionProblem, out: Path) -> Path:
        """This job's seeds into `out` (finished seeds are kept), and once every seed is there the
        mean at the last checkpoint as `scores.safetensors`; returns `out`."""
        ft, out = self.ft, Path(out)
        identity = self.spec.identity(problem.final_model_identity())
        dtype = getattr(torch, ft.dtype)
        model = with_batchnorm_momentum(problem.model.to(dtype), ft.batchnorm_momentum)
        x = problem.x_train.to(dtype) if problem.x_train.is_floating_point() else problem.x_train
        y = problem.y_train.to(dtype) if problem.task == "regression" else problem.y_train
        ft.checkpoint_steps(len(x))  # a schedule with no (or a misplaced) checkpoint is refused before any work
        optimizer = optimizer_spec(self.spec.further_optimizer)
        mode = self_effect_mode(ft.derivative_mode)
        for seed in ft.job_seeds:
            path = seed_file(out, seed)
            if self._verified(path, identity, seed):
                continue  # no lock (no write): a complete self-effect is readable from read-only storage
            with seed_lock(out, seed, None, wait=True):
                if self._verified(path, identity, seed):
                    continue
                t0 = time.perf_counter()
                tensors = self_effect_seed(model, optimizer, x, y, problem.task, ft, seed, mode,
                                           torch_device(self.accelerator), problem.memory_budget_mb)
                save_tensors(path, tensors, metadata={**identity, "seed": seed, "derivative_mode": mode,
                                                      "seconds": time.perf_counter() - t0},
                             what=f"the self-effect of seed {seed}")
                log.info("self-effect of seed %d (%s mode) -> %s in %.1fs", seed, mode, path.name,
                         time.perf_counter() - t0)
        self._merge(out, identity, problem.n_train)
        return out

    def _verified(self, path: Path, identity: dict, seed: int) -> bool:
        """Whether the seed's file exists, verifies and belongs to this final model and gold standard
        (raises if it exists but does not: it is never silently recomputed over, nor reused)."""
        if not path.is_file():
            return False
        _, header, _ = load_tensors_with_metadata(path)
        require_match(header, {**identity, "seed": seed}, f"the self-effect file {path}",
                      f"Delete {path.parent} and re-run `{COMMAND}` to compute it for this final model.")
        return True

    def _merge(self, out: Path, identity: dict, n_train: int) -> None:
        """`scores.safetensors` [n_train]: the mean over every seed at the last checkpoint, once all
        seeds are there (a job of some seeds only says how many are missing)."""
        missing = [s for s in self.ft.seeds if not seed_file(out, s).is_file()]
        if missing:
            log.info("self-effect: seeds %s are still missing in %s; the mean is written once they are there",
                     missing, out)
            return
        if scores_complete(out):
            log.info("self-effect complete: the mean of %d seeds is already in %s", len(self.ft.seeds), out)
            return
        effects, seconds = [], 0.0
        for seed in self.ft.seeds:
            self._verified(seed_file(out, seed), identity, seed)
            tensors, header, _ = load_tensors_with_metadata(seed_file(out, seed))
            effects.append(tensors["self_effect"][-1])
            seconds += float(header.get("seconds", 0.0))
        mean = torch.stack(effects).mean(0)
        config = {"further_training": identity["further_training"], "further_optimizer": identity["further_optimizer"]}
        save_method_scores(out, mean, {"method": "further_training", "config": config,
                                       "final_model": identity["final_model"], "shape": [n_train], "target": "self"},
                           {"seconds": seconds, "seeds": list(self.ft.seeds), "checkpoint": "last",
                            "key": out.name, "n_train": n_train})
        log.info("self-effect complete: the mean of %d seeds written to %s", len(self.ft.seeds), out)


def self_effect_seed(model: torch.nn.Module, optimizer: tuple[str, dict], x: torch.Tensor, y: torch.Tensor, task: str,
                     settings, seed: int, mode: str, device: torch.device,
                     memory_budget_mb: float) -> dict[str, torch.Tensor]:
    """One seed's self-effect: self_effect and full_loss [n_checkpoints, n_train], initial_loss
    [n_train], float64 (see the module docstring), the training rows in blocks whose derivatives
    [T, |J|, |J|] (forward) or [T, |J|, n_train] (reverse) take at most a quarter of the budget."""
    n, T = len(x), len(settings.checkpoint_steps(len(x)))
    block = max(1, min(n, int(memory_budget_mb * 2**20 / 4 // (8 * T * n))))
    effect = torch.empty(T, n, dtype=torch.float64)
    full = torch.empty(T, n, dtype=torch.float64)
    initial = torch.empty(n, dtype=torch.float64)
    for start in range(0, n, block):
        J = torch.arange(start, min(start + block, n))
        traj = WeightedTrajectory(model, optimizer, x, y, x[J], y[J], task, settings, seed, device=device)
        if mode == "forward":
            result = traj.forward_mode(J, memory_budget_mb)  # [T, |J| test, |J| instances]
            effect[:, J] = result.derivative.diagonal(dim1=1, dim2=2)
        else:
            result = traj.reverse_mode(None, memory_budget_mb)  # [T, |J| test, n instances]
            effect[:, J] = result.derivative[:, torch.arange(len(J)), J]
        full[:, J], initial[J] = result.full_loss, result.initial_loss
    FurtherTraining._check_finite(seed, full, full.new_zeros(T, n, 0), [], initial)  # the full-data run
    if not bool(torch.isfinite(effect).all()):
        raise DivergedError(f"the self-effect of seed {seed} is not finite for {int((~torch.isfinite(effect)).sum())} "
                            f"entries; nothing was written for this seed. Lower further_optimizer.lr or set "
                            f"further_training.clip_grad_norm, then re-run (finished seeds are kept).")
    return {"self_effect": effect, "full_loss": full, "initial_loss": initial}
