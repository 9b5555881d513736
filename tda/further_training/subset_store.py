"""The subset gold standard (`further_training.runs=subsets`, docs/lds.md) on disk, read back:
:class:`SubsetGoldStandard` and :func:`load_subset_gold_standard`, every file verified and checked
like every gold standard's (tda.further_training.store). The job that writes it:
tda.further_training.subset_gold.

On disk (`runs/<run>/gold/<key>/`):
  meta.json                  as every gold standard's, plus `subsets`: count, fraction, seed,
                             size (rows each subset keeps) and masks_sha256
  subsets.safetensors        masks [m, n_train] bool: the draw (written once, checked against the
                             settings by every job and against meta.json on every load)
  seed_00000.safetensors ... one file per seed (run per subset), written atomically when complete:
      margin | prediction    [n_checkpoints, n_test, m]  float64 (classification | regression)
      loss                   [n_checkpoints, n_test, m]  float64
  seed_00000.part_01_of_04.safetensors ...
                             the same for a contiguous block of the subsets (`subsets.block`);
                             the header names the block (`subset_block`)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from tda.artifacts import load_tensors_with_metadata, tensor_checksum
from tda.further_training.attribution import checkpoint_axis, gold_kind, runs_of
from tda.further_training.store import merge_seeds, read_meta, read_parts
from tda.provenance import ProvenanceError

MASKS = "subsets.safetensors"
BLOCK_KEY = "subset_block"  # a seed file's block of the subsets, in its header


@dataclass
class SubsetGoldStandard:
    """All completed seeds of a subset gold standard.

    outputs {name: [n_checkpoints, n_test, m, n_seeds]}: `margin` (classification) or
    `prediction` (regression), and `loss`; masks [m, n_train] bool (subset i keeps the rows
    where masks[i] is true)."""

    outputs: dict[str, torch.Tensor]
    masks: torch.Tensor
    seeds: list[int]
    meta: dict
    files: dict[str, str] = field(default_factory=dict)  # file name -> checksum of every file read

    @property
    def n_checkpoints(self) -> int:
        return self.outputs["loss"].shape[0]

    @property
    def kind(self) -> str:
        """`retraining subsets` or `further training subsets` (tda.further_training.attribution.gold_kind)."""
        return gold_kind(self.meta["further_training"])

    def checkpoint_axis(self) -> tuple[str, list[float]]:
        """The epochs, or the steps of the checkpoints, of runs over a subset's rows."""
        return checkpoint_axis(self.meta["further_training"], self.meta["subsets"]["size"], self.n_checkpoints)

    def target(self, name: str) -> torch.Tensor:
        """[n_checkpoints, n_test, m]: what a sum of scores over a subset predicts, averaged over the
        seeds: the margin or the prediction, or −loss for `loss` (higher = the subset serves the
        test instance better, the sign of a method's scores)."""
        if name not in self.outputs:
            raise ValueError(f"the subset gold standard records {sorted(self.outputs)}, not {name!r}")
        mean = self.outputs[name].mean(dim=-1)
        return -mean if name == "loss" else mean


def load_subset_gold_standard(gold_dir: Path, expected: dict | None = None, seeds: list[int] | None = None,
                              require_all: bool = True) -> SubsetGoldStandard:
    """Merge the per-seed (and per-block) files of a subset gold standard, each verified and
    checked like every gold standard's (tda.further_training.store.merge_seeds), and its masks,
    checked against meta.json. `expected`, `seeds`, `require_all`: as load_gold_standard."""
    gold_dir = Path(gold_dir)
    meta = read_meta(gold_dir, expected, recorded=("subsets",))
    if runs_of(meta["further_training"]) != "subsets":
        raise ValueError(f"{gold_dir} holds a leave-one-out gold standard, not a subset one; read it with "
                         f"tda.further_training.store.load_gold_standard")
    masks, _, checksum = load_tensors_with_metadata(gold_dir / MASKS)
    if checksum != meta["subsets"]["masks_sha256"] or tensor_checksum({"masks": masks["masks"]}) != checksum:
        raise ProvenanceError(f"{gold_dir / MASKS} is not the draw meta.json records; delete {gold_dir} and re-run "
                              f"the further_train stage")
    count = meta["subsets"]["count"]

    def merge(seed, found, identity, checksums):
        parts, missing, duplicated = read_parts(seed, found, identity, count, checksums, "loss", BLOCK_KEY)
        if parts is None:
            return None, missing, duplicated
        return {name: torch.cat([p[name] for p in parts], dim=-1) for name in parts[0]}, None, None

    present, merged, files = merge_seeds(gold_dir, meta, seeds, require_all, merge)
    names = sorted(merged[present[0]])
    outputs = {name: torch.stack([merged[s][name] for s in present], dim=-1) for name in names}
    return SubsetGoldStandard(outputs=outputs, masks=masks["masks"], seeds=present, meta=meta,
                              files={MASKS: checksum, **files})
