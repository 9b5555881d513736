"""The gold standard on disk: where it lives, what defines it, and reading it back.

On disk (`runs/<run>/gold/<key>/`, key: :func:`further_training_key`):
  meta.json                      settings, checkpoints, left-out and test indices
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
writes it: tda.further_training.gold_standard); :func:`load_gold_standard` merges them, naming
any seed or part that is missing or doubled, and refuses a file that belongs to another gold
standard or final model.

Two kinds of gold standard share all of this (:func:`gold_kind`, from `further_training.start`):
further training from the final model θᶠ (the default), and retraining from the final model's
initial weights with its final-training schedule (`gold_standard=retraining`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from tda.artifacts import IntegrityError, load_json, load_tensors_with_metadata
from tda.config import config_hash, node_name, to_container
from tda.further_training.checkpoints import checkpoint_steps, steps_per_epoch
from tda.provenance import ProvenanceError, require_match

# `further_training` settings that choose how or which part of the gold standard a job
# computes, not what it is: they are left out of the gold standard's directory key, so every
# shard and every engine writes into one directory.
EXECUTION_KEYS = ("engine", "max_runs_per_group", "sparse_input", "vmap", "shard_seeds", "left_out_shard",
                  "progress_bar", "derivative_mode")
# settings added after gold standards had been computed, with the value that means what the gold
# standard was before they existed: at that value they are left out of the key (and of every
# identity), so that existing gold-standard directories keep their names
OMITTED_AT_DEFAULT: dict[str, Any] = {"batchnorm_momentum": None, "estimator": "difference", "start": "final_model",
                                      "checkpoint_first_step": None, "checkpoint_last_step": False}

_SEED_FILE = re.compile(r"^seed_(\d+)(?:\.part_(\d+)_of_(\d+))?\.safetensors$")


# ---------------------------------------------------------------------------------- what defines it
def gold_settings(ft: DictConfig) -> dict:
    """The `further_training` settings that define the gold standard (what its key hashes)."""
    return {k: v for k, v in to_container(ft).items()
            if k not in EXECUTION_KEYS and not (k in OMITTED_AT_DEFAULT and v == OMITTED_AT_DEFAULT[k])}


def gold_kind(settings: dict) -> str:
    """`retraining` or `further training`: the kind of gold standard of recorded settings
    (`gold_settings`, meta.json's `further_training`): retraining starts from the final model's
    initial weights (`start: initial_weights`), further training from θᶠ (absent = the default)."""
    start = settings.get("start", OMITTED_AT_DEFAULT["start"])
    return "retraining" if start == "initial_weights" else "further training"


def estimator_of(settings: dict) -> str:
    """`difference` or `derivative`: the estimator of a gold standard's recorded settings
    (`gold_settings`, meta.json's `further_training`; absent = the default, difference)."""
    return str(settings.get("estimator", OMITTED_AT_DEFAULT["estimator"]))


def further_training_key(cfg: DictConfig) -> str:
    """Directory name of the gold standard of `cfg` (`gold/<key>/`): the fresh optimizer's name
    and a hash of the defining settings (EXECUTION_KEYS are left out, so shards fill one
    directory). Compute it once per stage and pass it on."""
    settings_hash = config_hash(gold_settings(cfg.further_training), cfg.further_optimizer)
    return f"{node_name(cfg.further_optimizer)}-{settings_hash}"


def gold_identity(final_model: dict[str, str], ft: DictConfig, further_optimizer: DictConfig) -> dict[str, Any]:
    """What a gold standard is computed from: the final model's identity (tda.provenance) and
    the settings that define it. Recorded in meta.json and in every seed file's header."""
    return {"final_model": final_model, "further_training": gold_settings(ft),
            "further_optimizer": to_container(further_optimizer)}


def expected_gold(final_model: dict[str, str], selection: dict, ft: DictConfig, further_optimizer: DictConfig) -> dict:
    """What the gold standard of a config must be (for :func:`load_gold_standard`'s `expected`)."""
    return {**gold_identity(final_model, ft, further_optimizer),
            "left_out_indices": selection["left_out_indices"], "test_indices": selection["test_indices"]}


# ---------------------------------------------------------------------------------- seeds, shards, files
def seeds_of(ft: DictConfig) -> list[int]:
    """Every seed of the gold standard: seed_offset .. seed_offset + n_seeds - 1."""
    return [int(ft.seed_offset) + i for i in range(int(ft.n_seeds))]


def job_seeds(ft: DictConfig) -> list[int]:
    """The seeds one job computes: `shard_seeds`, or every seed."""
    shard_seeds = ft.get("shard_seeds")
    return seeds_of(ft) if shard_seeds is None else [int(s) for s in shard_seeds]


def left_out_shard(ft: DictConfig) -> tuple[int, int]:
    """(index, count) of the job's block of left-out instances; (0, 1): all of them."""
    s = ft.get("left_out_shard")
    if s is None:
        return 0, 1
    return int(s.get("index", 0)), int(s.get("count", 1))


def is_sharded(ft: DictConfig) -> bool:
    """Whether a job computes only part of the gold standard (some seeds, or a left-out block)."""
    return ft.get("shard_seeds") is not None or left_out_shard(ft)[1] > 1


def shard_block(n_left_out: int, index: int, count: int) -> tuple[int, int]:
    """[start, stop) of left-out shard `index` of `count`: contiguous, sizes differ by at most one."""
    return index * n_left_out // count, (index + 1) * n_left_out // count


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


def job_files(ft: DictConfig, gold_dir: Path) -> list[Path]:
    """The gold-standard files one job writes: one per seed of `further_training.shard_seeds`
    (default: all seeds), for its block `further_training.left_out_shard`."""
    index, count = left_out_shard(ft)
    return [seed_file(Path(gold_dir), s, (index, count) if count > 1 else None) for s in job_seeds(ft)]


# ---------------------------------------------------------------------------------- checking a seed file
def check_seed_header(path: Path, header: dict, identity: dict, seed: int, part: tuple[int, int],
                      block: tuple[int, int]) -> None:
    """A seed file is what its name and its gold standard say: same identity, seed, part, block."""
    fix = f"Delete {path} and re-run the further_train stage (`tda-further-train <same overrides>`) to recompute it."
    require_match(header, identity, f"the gold-standard file {path}", fix)
    require_match(header, {"seed": seed, "part": list(part), "left_out_block": list(block)},
                  f"the gold-standard file {path} (its header names another seed or part than its file name: "
                  f"copied or renamed?)", fix)


def verified_seed(path: Path, identity: dict, seed: int, part: tuple[int, int], block: tuple[int, int]) -> bool:
    """Whether the seed's file exists, verifies, and belongs to this gold standard (raises if it
    exists but does not: it is never silently recomputed over, nor reused)."""
    if not path.is_file():
        return False
    _, header, _ = load_tensors_with_metadata(path)
    check_seed_header(path, header, identity, seed, part, block)
    return True


# ---------------------------------------------------------------------------------- the merged gold standard
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
        the checkpoints (tda.further_training.checkpoints.checkpoint_steps of the recorded settings
        and meta.json's n_train)."""
        ft = self.meta["further_training"]
        k = ft.get("checkpoint_every_steps")
        if not k:
            return "epoch", [float(i + 1) for i in range(self.n_checkpoints)]
        if "n_train" not in self.meta:
            raise ValueError("the gold standard's meta.json records no n_train, which the steps of its checkpoints "
                             "are computed from; delete it and re-run the further_train stage (`tda-further-train "
                             "<same overrides>`)")
        spe = steps_per_epoch(self.meta["n_train"], ft["batch_size"])
        steps = checkpoint_steps(int(ft["epochs"]) * spe, spe, int(k), ft.get("checkpoint_first_step"),
                                 bool(ft.get("checkpoint_last_step", False)))
        if len(steps) != self.n_checkpoints:
            raise ValueError(f"the gold standard's settings give {len(steps)} checkpoints but its files hold "
                             f"{self.n_checkpoints}; delete it and re-run the further_train stage "
                             f"(`tda-further-train <same overrides>`)")
        return "step", [float(s) for s in steps]

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
        a = a - a.mean(dim=2, keepdim=True)
    return a.mean(dim=-1)


# ---------------------------------------------------------------------------------- reading back
def _seed_files(gold_dir: Path, seed: int) -> dict[tuple[int, int], Path]:
    """{(part index, count): file} of one seed by file name; a whole-seed file is (0, 1)."""
    found: dict[tuple[int, int], Path] = {}
    for p in gold_dir.glob(f"seed_{seed:05d}*.safetensors"):
        named = _parse_seed_file(p.name)
        if named is not None and named[0] == seed:
            found[named[1]] = p
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
        check_seed_header(path, header, identity, seed, (i, count), block)
        if tensors["diff"].shape[-1] != block[1] - block[0]:
            return None, None, (f"{path.name} holds {tensors['diff'].shape[-1]} left-out instances, expected "
                                f"{block[1] - block[0]}; delete it and re-run")
        parts.append(tensors)
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
        raise FileNotFoundError(f"no gold standard in {gold_dir}; run the further_train stage "
                                f"(`tda-further-train` with the same overrides) first")
    meta = load_json(meta_path)
    fix = f"Delete {gold_dir} and re-run the further_train stage (`tda-further-train <same overrides>`)."
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
                                f"Re-run the further_train stage (`tda-further-train`) with the same overrides "
                                f"(and the same further_training.left_out_shard for missing parts) to finish them")
    present = [s for s in seeds if s in merged]
    distances = [merged[s]["distance_from_start"] for s in present]
    return GoldStandard(diff=torch.stack([merged[s]["diff"] for s in present], dim=-1),
                        full_loss=torch.stack([merged[s]["full_loss"] for s in present], dim=-1),
                        initial_loss=merged[present[0]]["initial_loss"], seeds=present, meta=meta,
                        files={name: c for name, c in sorted(checksums.items())
                               if any(name.startswith(f"seed_{s:05d}") for s in present)},
                        distance_from_start=None if any(d is None for d in distances)
                        else torch.stack(distances, dim=-1))


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


def gold_label(settings: dict) -> str:
    """A gold standard named by its estimator and removal, e.g. `derivative (mask)`, and, for
    retraining, its kind: `retraining: difference (drop)`."""
    label = f"{estimator_of(settings)} ({settings.get('removal')})"
    return f"retraining: {label}" if gold_kind(settings) == "retraining" else label


# ---------------------------------------------------------------------------------- siblings
# the settings in which two gold standards of one final model may differ and still be compared
# entry by entry: how instance j is removed, and whether the removal is trained or differentiated
SIBLING_KEYS = ("estimator", "removal")


def _gold_standards_in(gold_root: Path, skipped: list[str]) -> Iterator[tuple[str, dict, dict, dict]]:
    """(key, meta.json, its `further_training` settings, the identity to load it against) of
    every gold standard in `gold_root` (a run's `gold/`); an unreadable meta.json is named in
    `skipped` and passed over."""
    for meta_path in sorted(Path(gold_root).glob("*/meta.json")):
        key = meta_path.parent.name
        try:
            meta = load_json(meta_path)
        except (OSError, ValueError) as err:
            skipped.append(f"{key}: meta.json unreadable ({err})")
            continue
        settings = meta.get("further_training")
        if isinstance(settings, dict):
            yield key, meta, settings, {k: meta[k] for k in ("final_model", "further_training", "further_optimizer",
                                                              "left_out_indices", "test_indices")}


def _load_beside(gold_root: Path, key: str, expected: dict, seeds: list[int] | None, skipped: list[str]
                 ) -> GoldStandard | None:
    """The gold standard `key` in `gold_root`, verified against `expected` over `seeds`, or None
    with the reason in `skipped` (incomplete, conflicting, foreign or damaged files)."""
    try:
        return load_gold_standard(Path(gold_root) / key, expected, seeds, require_all=True)
    except (FileNotFoundError, ValueError) as err:
        skipped.append(f"{key} ({gold_label(expected['further_training'])}): {err}")
        return None


def sibling_gold_standards(gold: GoldStandard, gold_root: Path, own_key: str
                           ) -> tuple[dict[str, tuple[str, GoldStandard]], list[str]]:
    """The gold standards in `gold_root` (a run's `gold/`) that differ from `gold` only in
    SIBLING_KEYS: same final model, further optimizer, other settings, left-out and test indices
    (read from each one's meta.json, then every seed file verified through
    :func:`load_gold_standard` against that identity, over `gold`'s seeds). Returns
    ({label: (key, gold standard)}, [why each candidate with matching settings was skipped:
    incomplete, damaged])."""
    mine = {k: v for k, v in gold.meta["further_training"].items() if k not in SIBLING_KEYS}
    found: dict[str, tuple[str, GoldStandard]] = {}
    skipped: list[str] = []
    for key, meta, settings, expected in _gold_standards_in(gold_root, skipped):
        if key == own_key or {k: v for k, v in settings.items() if k not in SIBLING_KEYS} != mine or any(
                meta.get(k) != gold.meta[k] for k in ("final_model", "further_optimizer", "left_out_indices",
                                                      "test_indices")):
            continue
        other = _load_beside(gold_root, key, expected, gold.seeds, skipped)
        if other is not None:
            found[gold_label(settings)] = (key, other)
    return found, skipped


def further_training_beside(retraining: GoldStandard, gold_root: Path) -> tuple[dict[str, GoldStandard], list[str]]:
    """The further-training gold standards in `gold_root` (a run's `gold/`) of the same final
    model and left-out / test instances as the retraining gold standard `retraining`, each over
    the seeds its meta.json lists and verified through :func:`load_gold_standard`: what the
    paper's Figure 11 sets against leave-one-out retraining. Returns ({"<label> <key>": gold
    standard}, [why each candidate was skipped: incomplete, damaged])."""
    found: dict[str, GoldStandard] = {}
    skipped: list[str] = []
    for key, meta, settings, expected in _gold_standards_in(gold_root, skipped):
        if gold_kind(settings) != "further training" or any(
                meta.get(k) != retraining.meta[k] for k in ("final_model", "left_out_indices", "test_indices")):
            continue
        other = _load_beside(gold_root, key, expected, meta.get("seeds"), skipped)
        if other is not None:
            found[f"{gold_label(settings)} {key}"] = other
    return found, skipped
