"""The gold standard on disk: what defines it (its key), its files, and reading it back.

On disk (`runs/<run>/gold/<key>/`, tda.runs.RunDir.gold_dir; key: :attr:`GoldStandardSpec.key`):
  meta.json                      settings, checkpoints, left-out and test indices (:func:`write_meta`)
  seed_00000.safetensors ...     one file per seed, written atomically when the seed completes:
      diff          [n_checkpoints, n_test, n_left_out]  float64, loss(D∖j) − loss(D)   (eq. 17)
      full_loss     [n_checkpoints, n_test]              float64, the full-data run
      initial_loss  [n_test]                             float64, at the start (θᶠ)
      distance_from_start [n_checkpoints]                float64, ‖θ_t − θ_start‖₂ of the full-data
                                                         run (absent from files written before it)
  seed_00000.part_01_of_04.safetensors ...
                                 the same for a contiguous block of the left-out instances
                                 (`further_training.left_out_shard`); `diff` is
                                 [n_checkpoints, n_test, block size]; the files' metadata
                                 names the block.
Jobs given different `shard_seeds` / `left_out_shard` fill the same directory (the job that
writes it: tda.further_training.gold_standard); :func:`load_gold_standard` merges them into a
GoldStandard (tda.further_training.attribution), naming any seed or part that is missing or
doubled, and refuses a file that belongs to another gold standard or final model.

Two kinds of gold standard share all of this (tda.further_training.attribution.gold_kind, from
`further_training.start`): further training from the final model θᶠ (the default), and
retraining from the final model's initial weights with its final-training schedule
(`gold_standard=retraining`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from tda.artifacts import IntegrityError, load_json, load_tensors_with_metadata, save_json
from tda.config import config_hash, node_name, to_container
from tda.exits import RefusedError
from tda.further_training.attribution import FURTHER_TRAIN_COMMAND, GoldStandard, runs_of
from tda.further_training.settings import FurtherTrainingSettings, shard_block
from tda.provenance import ProvenanceError, require_match

META = "meta.json"
_SEED_FILE = re.compile(r"^seed_(\d+)(?:\.part_(\d+)_of_(\d+))?\.safetensors$")


# ---------------------------------------------------------------------------------- what defines it
@dataclass(frozen=True)
class GoldStandardSpec:
    """A gold standard as a config defines it: the `further_training` settings and the fresh
    optimizer (the resolved `further_optimizer` node). A stage builds it once, from the settings
    it checked, and passes it to the job, the store and the evaluation."""

    settings: FurtherTrainingSettings
    further_optimizer: dict[str, Any]

    @classmethod
    def from_config(cls, cfg: DictConfig, settings: FurtherTrainingSettings | None = None) -> GoldStandardSpec:
        """The gold standard of a composed config; `settings`: its `further_training` section,
        when the caller has built (and checked) it already."""
        if settings is None:
            settings = FurtherTrainingSettings.from_config(cfg.further_training)
        return cls(settings, dict(to_container(cfg.further_optimizer)))

    @property
    def defining(self) -> dict[str, Any]:
        """The settings that define the gold standard (FurtherTrainingSettings.keyed: how or which
        part a job computes is left out, so every engine and shard fills one directory)."""
        return self.settings.keyed()

    @functools.cached_property
    def key(self) -> str:
        """Directory name of the gold standard (`gold/<key>/`): the fresh optimizer's name and a
        hash of the defining settings and the optimizer."""
        name = node_name(self.further_optimizer, key="further_optimizer")
        return f"{name}-{config_hash(self.defining, self.further_optimizer)}"

    def identity(self, final_model: dict[str, str]) -> dict[str, Any]:
        """What the gold standard is computed from: the final model's identity (tda.provenance)
        and the defining settings. Recorded in meta.json and in every seed file's header."""
        return {"final_model": final_model, "further_training": self.defining,
                "further_optimizer": dict(self.further_optimizer)}

    def expected(self, final_model: dict[str, str], selection: dict) -> dict[str, Any]:
        """What the gold standard must be for this final model and selection (for
        :func:`load_gold_standard`'s `expected`)."""
        return {**self.identity(final_model), "left_out_indices": selection["left_out_indices"],
                "test_indices": selection["test_indices"]}

    def job_files(self, gold_dir: Path) -> list[Path]:
        """The files one job writes: one per seed of `shard_seeds` (default: all seeds), for its
        block of the columns (`left_out_shard`, or `subsets.block` for a subset gold standard)."""
        shard = self.settings.column_shard
        part = (shard.index, shard.count) if shard.count > 1 else None
        return [seed_file(Path(gold_dir), s, part) for s in self.settings.job_seeds]


def further_training_key(cfg: DictConfig) -> str:
    """The gold standard's directory name for a composed config (GoldStandardSpec.key); for
    scripts and tests holding a config: a stage keeps its spec and reads `spec.key`."""
    return GoldStandardSpec.from_config(cfg).key


# ---------------------------------------------------------------------------------- files
def seed_file(gold_dir: Path, seed: int, part: tuple[int, int] | None = None) -> Path:
    """The file of one seed; `part` = (index, count) of a left-out shard, count > 1."""
    if part is None or part[1] == 1:
        return gold_dir / f"seed_{seed:05d}.safetensors"
    return gold_dir / f"seed_{seed:05d}.part_{part[0] + 1:02d}_of_{part[1]:02d}.safetensors"


def _parse_seed_file(name: str) -> tuple[int, tuple[int, int]] | None:
    """(seed, (part index, count)) named by a seed file's name (a whole seed is part (0, 1)),
    or None for any other name; the inverse of :func:`seed_file`."""
    m = _SEED_FILE.match(name)
    if m is None:
        return None
    if m.group(2) is None:
        return int(m.group(1)), (0, 1)
    return int(m.group(1)), (int(m.group(2)) - 1, int(m.group(3)))


def write_meta(gold_dir: Path, identity: dict[str, Any], left_out_indices: list[int], test_indices: list[int],
               n_train: int, seeds: list[int], extra: dict[str, Any] | None = None) -> None:
    """meta.json: what the gold standard in `gold_dir` is (identity, indices, n_train, seeds, and
    `extra`: what a kind of gold standard records besides). An existing one written for another
    final model, settings or selection is refused; one of the same gold standard gains this
    job's seeds."""
    meta = {**identity, "left_out_indices": list(left_out_indices), "test_indices": list(test_indices),
            "n_train": n_train, "seeds": list(seeds), **(extra or {})}
    path = Path(gold_dir) / META
    if path.is_file():
        old = load_json(path)
        require_match(old, {k: v for k, v in meta.items() if k != "seeds"}, f"the gold standard in {gold_dir}",
                      f"Delete {gold_dir} (or move it away) and re-run this command to compute it for this model.")
        if sorted(set(old["seeds"]) | set(meta["seeds"])) == old["seeds"]:
            return  # shards running at the same time all find it already written
        meta["seeds"] = sorted(set(old["seeds"]) | set(meta["seeds"]))
    save_json(path, meta)


# ---------------------------------------------------------------------------------- checking a seed file
def check_seed_header(path: Path, header: dict, identity: dict, seed: int, part: tuple[int, int],
                      block: tuple[int, int], block_key: str = "left_out_block") -> None:
    """A seed file is what its name and its gold standard say: same identity, seed, part, block
    (of its columns, recorded under `block_key`: left-out instances or subsets)."""
    fix = f"Delete {path} and re-run {FURTHER_TRAIN_COMMAND} to recompute it."
    require_match(header, identity, f"the gold-standard file {path}", fix)
    require_match(header, {"seed": seed, "part": list(part), block_key: list(block)},
                  f"the gold-standard file {path} (its header names another seed or part than its file name: "
                  f"copied or renamed?)", fix)


def verified_seed(path: Path, identity: dict, seed: int, part: tuple[int, int], block: tuple[int, int],
                  block_key: str = "left_out_block") -> bool:
    """Whether the seed's file exists, verifies, and belongs to this gold standard (raises if it
    exists but does not: it is never silently recomputed over, nor reused)."""
    if not path.is_file():
        return False
    _, header, _ = load_tensors_with_metadata(path)
    check_seed_header(path, header, identity, seed, part, block, block_key)
    return True


# ---------------------------------------------------------------------------------- reading back
def _seed_files(gold_dir: Path, seed: int) -> dict[tuple[int, int], Path]:
    """{(part index, count): file} of one seed by file name; a whole-seed file is (0, 1)."""
    found: dict[tuple[int, int], Path] = {}
    for p in gold_dir.glob(f"seed_{seed:05d}*.safetensors"):
        named = _parse_seed_file(p.name)
        if named is not None and named[0] == seed:
            found[named[1]] = p
    return found


def read_parts(seed: int, parts_found: dict[tuple[int, int], Path], identity: dict, n_columns: int,
               files: dict[str, str], column: str, block_key: str = "left_out_block"
               ) -> tuple[list[dict] | None, str | None, str | None]:
    """(the tensors of each part in order, missing message, duplicate message) for one seed's
    files, each verified and checked against its own header (identity, seed, part, block of the
    `n_columns` columns: left-out instances or subsets, under `block_key`) and its tensor
    `column` against the block's width; `files` collects each file's checksum."""
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
        block = shard_block(n_columns, i, count)
        check_seed_header(path, header, identity, seed, (i, count), block, block_key)
        _require_finite_on_load(path, tensors)
        if tensors[column].shape[-1] != block[1] - block[0]:
            return None, None, (f"{path.name} holds {tensors[column].shape[-1]} columns, expected "
                                f"{block[1] - block[0]}; delete it and re-run")
        parts.append(tensors)
    return parts, None, None


def _require_finite_on_load(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Further training never writes NaN or inf (a diverged seed is not written): a seed file that
    holds them under a checksum that matches was written by another tool or a bug, and is refused
    rather than averaged in or counted as complete."""
    bad = [f"{name} ({int((~torch.isfinite(t)).sum())} of {t.numel()} values)" for name, t in tensors.items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise IntegrityError(f"{path} holds non-finite values (NaN/inf) in {', '.join(bad)}, which further training "
                             f"never writes (another tool wrote it, checksum included); delete it and re-run "
                             f"{FURTHER_TRAIN_COMMAND} to compute the seed again")


def _merge_seed(seed: int, parts_found: dict[tuple[int, int], Path], identity: dict, n_left_out: int,
                files: dict[str, str]) -> tuple[dict | None, str | None, str | None]:
    """(tensors, missing message, duplicate message) for one seed of a leave-one-out gold
    standard (:func:`read_parts`), its parts' full-data runs checked to agree."""
    parts, missing, duplicated = read_parts(seed, parts_found, identity, n_left_out, files, "diff")
    if parts is None:
        return None, missing, duplicated
    count = len(parts)
    full = parts[0]["full_loss"]
    # every part trains its own full-data run: the same run, equal up to rounding
    distance = None if any("distance_from_start" not in p for p in parts) else parts[0]["distance_from_start"]
    for i, p in enumerate(parts[1:], 2):
        same = torch.allclose(p["full_loss"], full, rtol=0, atol=1e-6 * (1 + float(full.abs().max())))
        if same and distance is not None:
            same = torch.allclose(p["distance_from_start"], distance, rtol=0,
                                  atol=1e-6 * (1 + float(distance.abs().max())))
        if not same:
            return None, None, (f"seed {seed}: part {i} of {count} has a different full-data run than part 1 "
                                f"(written with other settings?); delete the seed's files and re-run it")
    return {"diff": torch.cat([p["diff"] for p in parts], dim=-1), "full_loss": full,
            "initial_loss": parts[0]["initial_loss"], "distance_from_start": distance}, None, None


IDENTITY = ("final_model", "further_training", "further_optimizer")  # what every file of a gold standard carries


def read_meta(gold_dir: Path, expected: dict | None, recorded: tuple[str, ...] = ()) -> dict:
    """meta.json of the gold standard in `gold_dir`, checked to record its identity, indices,
    seeds and `recorded`, and to match `expected` (GoldStandardSpec.expected)."""
    meta_path = gold_dir / META
    if not meta_path.is_file():
        raise FileNotFoundError(f"no gold standard in {gold_dir}; run {FURTHER_TRAIN_COMMAND} first")
    meta = load_json(meta_path)
    fix = f"Delete {gold_dir} and re-run {FURTHER_TRAIN_COMMAND}."
    lacking = [k for k in (*IDENTITY, "left_out_indices", "test_indices", "seeds", *recorded) if k not in meta]
    if lacking:
        raise ProvenanceError(f"{meta_path} does not record {lacking}, so what the gold standard was computed from "
                              f"cannot be checked. {fix}")
    if expected is not None:
        require_match(meta, expected, f"the gold standard in {gold_dir}", fix)
    return meta


# merge_seed(seed, {(part, count): file}, identity, checksums) -> (tensors, missing message, duplicate message)
MergeSeed = Callable[[int, dict[tuple[int, int], Path], dict, dict[str, str]],
                     tuple[dict | None, str | None, str | None]]


def merge_seeds(gold_dir: Path, meta: dict, seeds: list[int] | None, require_all: bool, merge_seed: MergeSeed
                ) -> tuple[list[int], dict[int, dict], dict[str, str]]:
    """(the seeds merged, in order; {seed: its merged tensors}; {file name: checksum} of their
    files) of the gold standard in `gold_dir` over `seeds` (default: those meta.json lists).
    `merge_seed(seed, {(part, count): file}, identity, checksums)` merges one seed's files
    (:func:`read_parts`). Raises naming every seed or part that is missing (with `require_all`)
    or doubled."""
    identity = {k: meta[k] for k in IDENTITY}
    seeds = list(meta["seeds"]) if seeds is None else [int(s) for s in seeds]
    merged, missing, duplicated, checksums = {}, [], [], {}
    for s in seeds:
        found = _seed_files(gold_dir, s)
        if not found:
            missing.append(f"seed {s}")
            continue
        tensors, miss, dup = merge_seed(s, found, identity, checksums)
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
                                f"Re-run {FURTHER_TRAIN_COMMAND} (with the same further_training.left_out_shard / "
                                f"subsets.block for missing parts) to finish them")
    present = [s for s in seeds if s in merged]
    files = {name: c for name, c in sorted(checksums.items()) if any(name.startswith(f"seed_{s:05d}") for s in present)}
    return present, merged, files


def load_gold_standard(gold_dir: Path, expected: dict | None = None, seeds: list[int] | None = None,
                       require_all: bool = True) -> GoldStandard:
    """Merge the per-seed (and per-part) files of a leave-one-out gold standard.

    Every file is verified (checksum) and must carry the identity recorded in meta.json and the
    seed / part its name says. `expected` (GoldStandardSpec.expected) is what the current config
    and final model need: meta.json must match it. `seeds`: the seeds to merge (the config's;
    default: those meta.json lists). Raises naming every seed or part that is missing (with
    `require_all`), doubled (files of two shardings for one seed) or foreign."""
    gold_dir = Path(gold_dir)
    meta = read_meta(gold_dir, expected)
    if runs_of(meta["further_training"]) == "subsets":
        raise ValueError(f"{gold_dir} holds a subset gold standard (further_training.runs=subsets), not a "
                         f"leave-one-out one; read it with tda.further_training.subset_store.load_subset_gold_standard")
    n_left_out = len(meta["left_out_indices"])
    present, merged, files = merge_seeds(
        gold_dir, meta, seeds, require_all,
        lambda s, found, identity, checksums: _merge_seed(s, found, identity, n_left_out, checksums))
    distances = [merged[s]["distance_from_start"] for s in present]
    return GoldStandard(diff=torch.stack([merged[s]["diff"] for s in present], dim=-1),
                        full_loss=torch.stack([merged[s]["full_loss"] for s in present], dim=-1),
                        initial_loss=merged[present[0]]["initial_loss"], seeds=present, meta=meta, files=files,
                        distance_from_start=None if any(d is None for d in distances)
                        else torch.stack(distances, dim=-1))


def gold_status(gold_dir: Path, expected: dict, seeds: list[int], complete: bool,
                load: Callable[..., Any] = load_gold_standard) -> str:
    """After a further-training job: merge what is on disk (with `load`, the loader of its kind of
    gold standard). `complete` (an unsharded job) requires every seed; a shard reports what the
    other jobs still have to deliver."""
    try:
        gold = load(gold_dir, expected, seeds, require_all=True)
    except (FileNotFoundError, ValueError) as err:
        # a shard's own files are written and verified; what other jobs still owe (or wrote
        # twice) is for the merge in the evaluate stage to refuse
        if complete or isinstance(err, (ProvenanceError, IntegrityError)):
            raise
        return f"this shard is done; the gold standard cannot be merged yet: {err}"
    if isinstance(gold, GoldStandard):
        require_variation(gold, gold_dir)
    shape = {"diff": list(gold.diff.shape)} if hasattr(gold, "diff") else \
        {name: list(t.shape) for name, t in gold.outputs.items()}
    return f"gold standard complete: {len(gold.seeds)} seeds, " + ", ".join(f"{k} {v}" for k, v in shape.items())


def require_variation(gold: GoldStandard, gold_dir: Path) -> None:
    """Refuse a leave-one-out gold standard in which leaving any one instance out changed every
    test loss by the same amount, at every checkpoint and for every test instance: it ranks
    nothing, so no cosine, Spearman or top k could be computed from it except from tie order
    (e.g. a learning rate so small that no weight moved: further_optimizer.lr=1e-20)."""
    a = gold.attribution(center=False)  # [n_checkpoints, n_test, n_left_out]
    if a.shape[-1] > 1 and bool((a.amax(-1) == a.amin(-1)).all()):
        spread = float(gold.diff.abs().max())
        raise RefusedError(
            f"gold standard in {gold_dir} has no variation: for every test instance and checkpoint each left-out "
            f"instance changed the test loss by the same amount (largest |loss difference| {spread:.3g}), so it "
            f"ranks nothing; further training moved too little to tell the instances apart. Raise "
            f"further_optimizer.lr or further_training.epochs (or check further_training.clip_grad_norm)")
