"""The job that writes the subset gold standard (`further_training.runs=subsets`, docs/lds.md)
into `gold/<key>/`, seed by seed and block of subsets by block; its files and reading them back:
tda.further_training.subset_store; what a run on a subset is: tda.further_training.subsets.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tda.artifacts import load_tensors_with_metadata, save_tensors
from tda.config import ConfigError, build
from tda.exits import DivergedError
from tda.further_training.engine import fit_runs
from tda.further_training.gold_standard import (
    FurtherTraining,
    compute_seeds,
    runs_per_group,
    training_tensors,
    with_batchnorm_momentum,
)
from tda.further_training.optim import optimizer_spec
from tda.further_training.progress import GoldProgress, quiet_lightning
from tda.further_training.reference import test_losses
from tda.further_training.settings import shard_block
from tda.further_training.stacked import build_stacked
from tda.further_training.store import GoldStandardSpec, verified_seed, write_meta
from tda.further_training.subset_store import BLOCK_KEY, MASKS
from tda.further_training.subsets import OUTPUTS, SubsetRuns, draw_subsets, kept_rows, reference_run, subset_orders
from tda.models.structure import linear_relu_stack, should_use_sparse
from tda.problem import AttributionProblem
from tda.provenance import ProvenanceError, require_match

log = logging.getLogger(__name__)


class SubsetTraining:
    """The subset gold standard of one final model: per seed, one run per subset of this job's
    block (`further_training.subsets.block`), from the problem's model (θᶠ, or for retraining the
    final model's initial weights, which the stage puts in the problem; or fresh weights per seed),
    with a fresh optimizer; written per seed (and block).

    `spec`: the gold standard (its `further_training` settings and the fresh optimizer);
    `accelerator`: where the runs train (`trainer.accelerator`)."""

    def __init__(self, spec: GoldStandardSpec, accelerator: str = "cpu"):
        self.spec, self.ft, self.accelerator = spec, spec.settings, str(accelerator)

    def run(self, problem: AttributionProblem, gold_dir: Path,
            initial_weights: Callable[[int], dict[str, torch.Tensor]] | None = None) -> list[int]:
        """Compute this job's seeds and block of subsets of `problem` into `gold_dir`; returns the
        seeds done (computed now or found complete on disk). `initial_weights(seed)`: the trainable
        part's weights each seed starts from (`subsets.initialisation=per_seed`); None: the
        problem's model."""
        ft, sub = self.ft, self.ft.subsets
        gold_dir = Path(gold_dir)
        dtype = getattr(torch, ft.dtype)
        model = with_batchnorm_momentum(problem.model.to(dtype), ft.batchnorm_momentum)
        x, y, x_test, y_test = training_tensors(problem, dtype)
        masks = draw_subsets(problem.n_train, sub)
        kept = kept_rows(masks)
        ft.checkpoint_steps(kept.shape[1])  # a schedule without a checkpoint is refused before any work
        if ft.engine == "stacked":
            kind, hp = optimizer_spec(self.spec.further_optimizer)  # SGD / Adam / AdamW, refused here otherwise
        identity = self.spec.identity(problem.final_model_identity())
        masks_sha256 = _write_masks(gold_dir, masks, identity)
        write_meta(gold_dir, identity, problem.left_out_indices.tolist(), problem.test_indices.tolist(),
                   problem.n_train, ft.seeds, extra={"subsets": {"count": sub.count, "fraction": sub.fraction,
                                                                 "seed": sub.seed, "size": kept.shape[1],
                                                                 "masks_sha256": masks_sha256}})
        index, count = sub.block.index, sub.block.count
        start, stop = shard_block(sub.count, index, count)
        part = (index, count) if count > 1 else None
        subsets = list(range(start, stop))
        sparse = should_use_sparse(x.reshape(len(x), -1), ft.sparse_input) and linear_relu_stack(model) is not None
        group = 1 if ft.engine == "reference" else (
            ft.max_runs_per_group or runs_per_group(model, x, ft.batch_size, dtype, problem.memory_budget_mb, sparse))

        def compute(seed: int, path: Path, bar: GoldProgress) -> None:
            t0 = time.perf_counter()
            start_model = model
            if initial_weights is not None:
                start_model = copy.deepcopy(model)
                start_model.load_state_dict(initial_weights(seed))
            initial = test_losses(start_model, x_test, y_test, problem.task)
            out = []
            for g, g0 in enumerate(range(0, len(subsets), group)):
                bar.start(seed, g)
                chunk = subsets[g0:g0 + group]
                if ft.engine == "reference":
                    out += [reference_run(start_model, build(self.spec.further_optimizer), x, y, x_test, y_test,
                                          problem.task, kept[i], i, seed, ft.epochs, ft.batch_size,
                                          ft.clip_grad_norm, **ft.schedule).unsqueeze(2) for i in chunk]
                else:
                    stacked = build_stacked(start_model, len(chunk), x, y, problem.task, fast_path=True,
                                            sparse_input=ft.sparse_input, vmap=ft.vmap, device=self.accelerator)
                    runs = SubsetRuns(stacked, kind, hp, subset_orders(kept[chunk], chunk, seed, ft.epochs),
                                      ft.batch_size, seed, x_test, y_test, problem.task, ft.clip_grad_norm,
                                      **ft.schedule)
                    fit_runs(runs, ft.epochs, self.accelerator, dtype)
                    out.append(runs.result())
                bar.advance(seed)
            result = torch.cat(out, dim=2)  # [T, n_test, block, 2]
            _check_diverged(seed, result[..., 1], subsets, initial)
            target, _ = OUTPUTS[problem.task]
            meta: dict[str, Any] = {**identity, "seed": seed, "seconds": time.perf_counter() - t0,
                                    "engine": ft.engine, BLOCK_KEY: [start, stop], "part": [index, count]}
            save_tensors(path, {target: result[..., 0], "loss": result[..., 1]}, metadata=meta,
                         what=f"subset gold-standard seed {seed}")
            log.info("subsets seed %d (%s) -> %s in %.1fs", seed, ft.engine, path.name, meta["seconds"])

        groups = -(-len(subsets) // group)
        with quiet_lightning(), GoldProgress(ft.job_seeds, groups, "run" if group == 1 else "group",
                                             enabled=ft.progress_bar) as bar:
            return compute_seeds(gold_dir, ft.job_seeds, part,
                                 lambda seed, path: verified_seed(path, identity, seed, (index, count), (start, stop),
                                                                  BLOCK_KEY),
                                 lambda seed, path: compute(seed, path, bar), bar)


def require_every_training_instance(left_out: list[int], n_train: int, run_name: str) -> None:
    """The subset gold standard is read by the linear datamodeling score, which sums each method's
    scores over a subset's rows: the run's selection (`left_out` of its `n_train` training rows)
    must make its methods score every training instance."""
    if sorted(left_out) != list(range(n_train)):
        raise ConfigError(f"further_training.runs=subsets: the linear datamodeling score sums each method's scores "
                          f"over a subset's training rows, but the selection of {run_name} attributes "
                          f"{len(left_out)} of the {n_train} training instances; train, attribute and further-train "
                          f"with selection.n_left_out=null (a run directory of its own, whose methods score every "
                          f"training instance)")


def _write_masks(gold_dir: Path, masks: torch.Tensor, identity: dict) -> str:
    """Write the draw into `gold_dir` (or check the one there equals it); returns its checksum."""
    path = gold_dir / MASKS
    if path.is_file():
        tensors, header, checksum = load_tensors_with_metadata(path)
        fix = f"Delete {gold_dir} (or move it away) and re-run the further_train stage."
        require_match(header, identity, f"the subsets in {path}", fix)
        if not torch.equal(tensors["masks"], masks):
            raise ProvenanceError(f"the subsets in {path} are not the draw of further_training.subsets (count, "
                                  f"fraction, seed) for these {masks.shape[1]} training rows. {fix}")
        return checksum
    return save_tensors(path, {"masks": masks}, metadata=identity, what="the subsets' masks")


def _check_diverged(seed: int, loss: torch.Tensor, subsets: list[int], initial: torch.Tensor) -> None:
    """Diverged runs are never written: loss [T, n_test, r] of the runs on `subsets`; a run
    diverged when a test loss is NaN/inf or its mean test loss at a checkpoint exceeds the bound
    of FurtherTraining._check_finite (10 × the start's mean test loss + 1)."""
    limit = FurtherTraining.DIVERGENCE_FACTOR * float(initial.mean()) + FurtherTraining.DIVERGENCE_FLOOR
    bad = (~torch.isfinite(loss)).flatten(0, 1).any(0) | (loss.mean(1) > limit).any(0)
    if bool(bad.any()):
        which = [subsets[i] for i in bad.nonzero().flatten().tolist()]
        raise DivergedError(f"training diverged for seed {seed} on subsets {which} (NaN/inf test loss, or a mean test "
                            f"loss above {limit:.4g} = {FurtherTraining.DIVERGENCE_FACTOR:g} x the start's mean test "
                            f"loss + {FurtherTraining.DIVERGENCE_FLOOR:g}). Nothing was written for this seed. Lower "
                            f"the learning rate or set further_training.clip_grad_norm, then re-run (finished seeds "
                            f"are kept).")
