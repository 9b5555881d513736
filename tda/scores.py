"""A method's scores on disk: `methods/<method>-<hash>/` holds `record.json` (settings, timing,
indices, provenance) and `scores.safetensors` (`scores` [n_test, n_left_out], float64); its
self-influence (`self_influence/<method>-<hash>/`) the same files with `scores` [n_train].

The scores file is written last, so its presence marks a completed method. Reading verifies
the file's checksum, that `record.json` names that checksum, that both were computed from the
given final model (tda.provenance) for the given shape, and that every score is finite.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tda.artifacts import (
    load_json,
    load_tensors_with_metadata,
    save_json,
    save_tensors,
    tensor_checksum,
)
from tda.exits import RefusedError
from tda.provenance import ProvenanceError, require_match

SCORES, RECORD = "scores.safetensors", "record.json"


def scores_complete(out: Path) -> bool:
    """Whether the method in `out` completed: its scores file is written last."""
    return (out / SCORES).is_file()


def save_method_scores(out: Path, scores: torch.Tensor, header: dict, record: dict) -> None:
    """Write `scores` ([n_test, n_left_out], or self-influence [n_train]) with `header` (method,
    config, final model, shape) in the file and `header | record` in record.json."""
    tensors = {"scores": scores.detach().double().cpu()}
    what = f"the scores of {header.get('method')}"
    require_finite_scores(str(header.get("method")), tensors["scores"], "the method failed numerically and nothing "
                          "was written. To fix: re-run with settings that keep it finite (e.g. a larger "
                          "method.damping_multiple, or method.dtype=float64)")
    save_json(out / RECORD, header | record | {"scores_sha256": tensor_checksum(tensors)})
    save_tensors(out / SCORES, tensors, metadata=header, what=what)


def load_method_scores(out: Path, final_model: dict, shape: tuple[int, ...]) -> tuple[torch.Tensor, dict]:
    """(scores of `shape`, record) of the method in `out`, verified and checked to belong to
    `final_model`; raises naming the problem and the fix."""
    fix = f"Delete {out} and re-run `python attribute.py method=<this method> <same overrides>` to recompute them."
    tensors, header, checksum = load_tensors_with_metadata(out / SCORES)
    record = load_json(out / RECORD)
    require_match(header, {"final_model": final_model, "shape": list(shape)}, f"the scores in {out}", fix)
    if record.get("scores_sha256") != checksum or record.get("final_model") != header["final_model"]:
        raise ProvenanceError(f"{out / RECORD} does not describe {out / SCORES} (copied from another run?). {fix}")
    require_finite_scores(str(header.get("method")), tensors["scores"], _recompute(str(out)))
    return tensors["scores"], record


def require_finite_scores(name: str, scores: torch.Tensor, fix: str | None = None) -> None:
    """Refuse scores [n_test, n_left_out] (or self-influence [n_train]) holding NaN/inf; `fix`
    ends the message (by default: delete the method's directory and compute it again). No method
    writes them (save_method_scores refuses), so a file that holds them under a matching
    checksum was written by another tool or a bug. Left in, a NaN would make a test instance's
    similarity "undefined" (skipped) and its ranks arbitrary: the method scored on a subset it
    did not choose."""
    bad = ~torch.isfinite(scores)
    if bool(bad.any()):
        rows = (bad.any(-1) if bad.dim() == 2 else bad).nonzero().flatten().tolist()
        where = "test positions" if bad.dim() == 2 else "training positions"
        raise RefusedError(
            f"scores of {name} hold {int(bad.sum())} NaN/inf entries of {scores.numel()} ({where} "
            f"{rows[:10]}{' ...' if len(rows) > 10 else ''}); "
            + (fix or _recompute("its directory under methods/")))


def _recompute(directory: str) -> str:
    return (f"the method failed numerically or another tool wrote them. To fix: delete {directory} and re-run "
            f"attribute.py for it with settings that keep it finite, or leave it deleted to evaluate the other "
            f"methods")
