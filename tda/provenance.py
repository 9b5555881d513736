"""What produced an artifact, checked by content whenever it is loaded or reused.

The identity of a final model is four fingerprints, recorded in the header of
`final_model.safetensors` when it is trained:

    weights     SHA-256 of its tensors (also the file's integrity checksum)
    data        fingerprint of the training and test tensors (`DataBundle.fingerprint`)
    selection   fingerprint of the left-out and test indices in `selection.json` (and of the
                flipped training labels, with label noise)
    run         the run key: dataset / model / optimizer / train / selection / seed settings

Every derived artifact (cached features, each seed or part of the gold standard and its
`meta.json`, each method's scores, each evaluation) records the identity of the final model it
was computed from, plus the settings that define it. A stage reads the current identity with
:func:`read_final_model` (which verifies the weights and the selection against it) and compares
every artifact it loads or reuses with :func:`require_match`, which names each field that
differs (a missing field counts as different) and says what to do.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import shutil
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from tda.artifacts import IntegrityError, load_json, load_tensor_metadata, load_tensors_with_metadata, tensor_checksum
from tda.config import config_hash, to_container
from tda.exits import UserError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
IDENTITY_FIELDS = ("weights", "data", "selection", "run")


class ProvenanceError(UserError, ValueError):
    """Artifacts that were produced for different configurations, models or instances."""


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """The git commit of the working tree (and whether it has uncommitted changes) if the
    code lives in a git checkout, else the installed package version."""
    out: dict[str, Any] = {}
    try:
        out["package_version"] = importlib.metadata.version("tda")
    except Exception:  # noqa: BLE001 - not installed as a distribution (e.g. run from a source tree)
        out["package_version"] = None
    try:
        commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        # --no-optional-locks: a stage killed mid-way never leaves the checkout's index.lock behind
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "--no-optional-locks", "status", "--porcelain",
                                "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        out["git_commit"], out["git_dirty"] = commit, bool(dirty)
    except Exception:  # noqa: BLE001 - no git, or not a checkout: the package version is all we have
        out["git_commit"], out["git_dirty"] = None, None
    return out


def environment() -> dict[str, Any]:
    """What of the machine a computation's last bits depend on: torch's version and its number
    of intra-op threads (a float sum split over more threads rounds differently; docs/scale_out.md,
    "Reproducing a number bit for bit")."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads()}


def stamp(stage: str, config: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A provenance record: `config` maps config-node names to nodes (resolved here); `extra`
    holds shapes, index lists, fingerprints."""
    resolved = {k: to_container(v) for k, v in config.items()}
    return {"stage": stage, "code_version": code_version(), "environment": environment(),
            "created": datetime.now(timezone.utc).isoformat(),
            "config_hash": config_hash(*(resolved[k] for k in sorted(resolved))), "config": resolved, **extra}


def reproduction_note(previous: dict[str, Any], weights: str) -> str | None:
    """What to say when a retrained final model (checksum `weights`) replaces `previous` (the
    header of the model it replaces) and differs from it: the thread counts or torch versions
    that differ, with the command that reproduces the old model; None when it is the same model
    bit for bit."""
    if previous.get("identity", {}).get("weights") == weights:
        return None
    was, now = previous.get("environment") or {}, environment()
    changed = [f"{k} {was.get(k, 'unrecorded')} then, {now[k]} now" for k in now if was.get(k) != now[k]]
    if not changed:
        return ("the retrained final model differs from the one it replaces although torch and the thread count "
                "are the same; the data, the code or the machine's CPU changed")
    fix = f"; run with OMP_NUM_THREADS={was['threads']} to reproduce it bit for bit" if "threads" in was else ""
    return (f"the retrained final model differs from the one it replaces in its last bits ({'; '.join(changed)}): "
            f"final training's float sums depend on them{fix}")


def require_match(found: dict[str, Any], expected: dict[str, Any], what: str, fix: str) -> None:
    """Raise :class:`ProvenanceError` naming every key whose value in `found` (read from an
    artifact) differs from `expected` (what the current stage needs). A key missing from
    `found` is a difference: an artifact that cannot say what it was computed from is not used."""
    diffs = []
    for key, want in expected.items():
        if key not in found:
            diffs.append(f"{key}: missing from the artifact, this run needs {_short(to_container(want))}")
            continue
        have, want = to_container(found[key]), to_container(want)
        if have != want:
            diffs.append(f"{key}: {_describe_difference(have, want)}")
    if diffs:
        raise ProvenanceError(f"refusing to combine {what}, which was produced for a different final model, "
                              f"configuration or set of instances:\n  - " + "\n  - ".join(diffs) + f"\n{fix}")


def _describe_difference(have: Any, want: Any) -> str:
    if isinstance(have, dict) and isinstance(want, dict):
        keys = sorted(set(have) | set(want), key=str)
        missing = "<missing>"
        parts = [f"{k}: artifact has {_short(have.get(k, missing))}, this run needs {_short(want.get(k, missing))}"
                 for k in keys if have.get(k, "<missing>") != want.get(k, "<missing>")]
        return "; ".join(parts)
    return f"artifact has {_short(have)}, this run needs {_short(want)}"


def _short(value: Any, limit: int = 160) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------ fingerprints
def selection_fingerprint(left_out_indices: list[int], test_indices: list[int],
                          label_noise: dict[str, Any] | None = None) -> str:
    """Fingerprint of a selection: the left-out and test indices, in order, and the record of the
    flipped training labels (tda.data.label_noise) when there is one."""
    content: dict[str, Any] = {"left_out_indices": [int(i) for i in left_out_indices],
                               "test_indices": [int(i) for i in test_indices]}
    if label_noise:  # absent without noise: the fingerprints of runs on clean labels are unchanged
        content["label_noise"] = label_noise
    payload = json.dumps(content, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def data_fingerprint(*tensors: torch.Tensor) -> str:
    """Fingerprint of tensors by content (for problems built outside the stages)."""
    return tensor_checksum({str(i): t for i, t in enumerate(tensors)})[:16]


def identity(weights: str, data: str, selection: str, run: str) -> dict[str, str]:
    """The identity of a final model (see the module docstring)."""
    return {"weights": weights, "data": data, "selection": selection, "run": run}


@dataclass(frozen=True)
class FinalModel:
    """A final model read back and verified: its weights, its identity, its selection."""

    state_dict: dict[str, torch.Tensor]
    identity: dict[str, str]
    selection: dict[str, Any]
    header: dict[str, Any]


def read_final_model(run) -> FinalModel:
    """Load and verify the final model of `run` (a tda.runs.RunDir, derived from the config): the
    weights against their checksum, the model's recorded run key against the directory's, and
    `selection.json` against its own checksum and the selection the model records. Raises naming
    the problem and the fix."""
    # the checks of recorded indices live with the selection, whose module loads the data libraries
    from tda.selection import validate_indices  # noqa: PLC0415 - keeps `datasets` out of importing provenance

    run.require_final_model()
    retrain = "retrain it with `python train.py <same overrides> train.overwrite=true`"
    try:
        state, header, weights = load_tensors_with_metadata(run.final_model)
    except IntegrityError as err:
        raise IntegrityError(f"the final model {run.final_model} is damaged or truncated ({err}); {retrain}") from err
    have = header.get("identity", {})
    require_match(have, {"run": run.key}, f"the final model {run.final_model}",
                  f"It was trained for other dataset/model/optimizer/train/selection/seed settings (copied from "
                  f"another run directory?); {retrain}, or point paths.runs_dir at the folder it belongs to.")
    if have.get("weights") != weights:
        raise ProvenanceError(f"the final model {run.final_model} records weights {have.get('weights')!r} but holds "
                              f"{weights!r}; {retrain}")
    selection = load_json(run.selection)
    n_train, n_test = selection.get("n_train"), selection.get("n_test_total")
    validate_indices(selection.get("left_out_indices"), n_train, "left_out_indices", run.selection)
    validate_indices(selection.get("test_indices"), n_test, "test_indices", run.selection)
    noise = selection.get("label_noise")
    if noise is not None:
        validate_indices(noise.get("flipped_indices"), n_train, "label_noise.flipped_indices", run.selection)
    sel = selection_fingerprint(selection["left_out_indices"], selection["test_indices"], noise)
    if have.get("selection") != sel or have.get("data") != selection.get("data_fingerprint"):
        raise ProvenanceError(f"{run.selection} does not belong to the final model {run.final_model} (its indices "
                              f"or data fingerprint differ from those the model was trained with); restore it, or "
                              f"{retrain}")
    missing = [f for f in IDENTITY_FIELDS if not have.get(f)]
    if missing:
        raise ProvenanceError(f"the final model {run.final_model} does not record {missing}; {retrain}")
    identity = {f: have[f] for f in IDENTITY_FIELDS}
    return FinalModel(state_dict=state, identity=identity, selection=selection, header=header)


def read_initial_model(run, final: FinalModel) -> dict[str, torch.Tensor]:
    """The weights the final model of `run` started from (`initial_model.safetensors`, written by
    train.py: the state-dict entries that final training changed; the rest equal the final
    model's), verified: its checksum, and the identity of `final` (read by
    :func:`read_final_model`) in its header. Raises naming the problem and the fix."""
    retrain = "re-run `python train.py <same overrides> train.overwrite=true` (the same final model, now with its " \
              "initial weights recorded)"
    if not run.initial_model.is_file():
        raise FileNotFoundError(f"the final model in {run.path} was trained before initial weights were recorded "
                                f"(no {run.initial_model.name}); {retrain}")
    try:
        state, header, _ = load_tensors_with_metadata(run.initial_model)
    except IntegrityError as err:
        raise IntegrityError(f"the initial weights {run.initial_model} are damaged or truncated ({err}); "
                             f"{retrain}") from err
    require_match(header, {"identity": final.identity}, f"the initial weights {run.initial_model}",
                  f"They belong to another final model (copied, or final training was interrupted before it "
                  f"wrote its model?); {retrain}.")
    return state


def supersede_dependents(run, new_identity: dict[str, str]) -> Path | None:
    """Before a retrained final model replaces the one in `run` (`train.overwrite=true`): if the
    new model differs, move everything computed from the old one into
    `superseded/<old weights>/`, so that nothing of it is reused with the new model (and
    nothing is lost). Returns where it went, or None when nothing had to move."""
    if not run.final_model.is_file():
        return None  # whatever is there records its own final model and is checked on load
    try:
        old = load_tensor_metadata(run.final_model).get("identity")
    except Exception:  # noqa: BLE001 - an unreadable model: nothing computed from it can be vouched for
        old = None
    if old == new_identity:
        return None  # retrained to the same weights: every result still belongs to it
    present = [p for p in run.dependents if p.exists()]
    if not present:
        return None
    dest = run.superseded / str((old or {}).get("weights", "unreadable"))[:12]
    while dest.exists():
        dest = dest.with_name(dest.name + "+")
    dest.mkdir(parents=True)
    for p in present:
        shutil.move(str(p), str(dest / p.name))
    log.warning(
        "the retrained final model differs from the one in %s; what was computed from the old one (%s) moved to %s",
        run.path, ", ".join(p.name for p in present), dest)
    return dest
