"""The other gold standards of one final model in its run directory, for the evaluation to set
beside its own: its siblings (the same settings but another estimator or removal) and, for a
retraining gold standard, the further-training ones; and the label each goes by."""

from __future__ import annotations

from collections.abc import Iterator

from tda.artifacts import load_json
from tda.further_training.attribution import GoldStandard, gold_kind, runs_of
from tda.further_training.settings import FurtherTrainingSettings
from tda.further_training.store import META, load_gold_standard
from tda.runs import RunDir


def estimator_of(recorded: dict) -> str:
    """`difference` or `derivative`: the estimator of a gold standard's recorded settings (its
    keyed settings, meta.json's `further_training`)."""
    return str(recorded.get("estimator", FurtherTrainingSettings.default("estimator")))  # absent: at its default


def gold_label(recorded: dict) -> str:
    """A gold standard named by its estimator and removal, e.g. `derivative (mask)`, and, for
    retraining, its kind: `retraining: difference (drop)`."""
    label = f"{estimator_of(recorded)} ({recorded.get('removal')})"
    return f"retraining: {label}" if gold_kind(recorded) == "retraining" else label


# the settings in which two gold standards of one final model may differ and still be compared
# entry by entry: how instance j is removed, and whether the removal is trained or differentiated
SIBLING_KEYS = ("estimator", "removal")


def _gold_standards_in(run: RunDir, skipped: list[str]) -> Iterator[tuple[str, dict, dict, dict]]:
    """(key, meta.json, its `further_training` settings, the identity to load it against) of
    every gold standard of `run` with a meta.json; an unreadable one is named in `skipped` and
    passed over."""
    for gold_dir in run.gold_dirs():
        key, meta_path = gold_dir.name, gold_dir / META
        if not meta_path.is_file():
            continue
        try:
            meta = load_json(meta_path)
        except (OSError, ValueError) as err:
            skipped.append(f"{key}: {META} unreadable ({err})")
            continue
        settings = meta.get("further_training")
        if isinstance(settings, dict):
            yield key, meta, settings, {k: meta[k] for k in ("final_model", "further_training", "further_optimizer",
                                                              "left_out_indices", "test_indices")}


def _load_beside(run: RunDir, key: str, expected: dict, seeds: list[int] | None, skipped: list[str]
                 ) -> GoldStandard | None:
    """The gold standard `key` of `run`, verified against `expected` over `seeds`, or None with
    the reason in `skipped` (incomplete, conflicting, foreign or damaged files)."""
    try:
        return load_gold_standard(run.gold_dir(key), expected, seeds, require_all=True)
    except (FileNotFoundError, ValueError) as err:
        skipped.append(f"{key} ({gold_label(expected['further_training'])}): {err}")
        return None


def sibling_gold_standards(gold: GoldStandard, run: RunDir, own_key: str
                           ) -> tuple[dict[str, tuple[str, GoldStandard]], list[str]]:
    """The gold standards of `run` (its `gold/`) that differ from `gold` only in
    SIBLING_KEYS: same final model, further optimizer, other settings, left-out and test indices
    (read from each one's meta.json, then every seed file verified through
    :func:`load_gold_standard` against that identity, over `gold`'s seeds). Returns
    ({label: (key, gold standard)}, [why each candidate with matching settings was skipped:
    incomplete, damaged])."""
    mine = {k: v for k, v in gold.meta["further_training"].items() if k not in SIBLING_KEYS}
    found: dict[str, tuple[str, GoldStandard]] = {}
    skipped: list[str] = []
    for key, meta, settings, expected in _gold_standards_in(run, skipped):
        if key == own_key or {k: v for k, v in settings.items() if k not in SIBLING_KEYS} != mine or any(
                meta.get(k) != gold.meta[k] for k in ("final_model", "further_optimizer", "left_out_indices",
                                                      "test_indices")):
            continue
        other = _load_beside(run, key, expected, gold.seeds, skipped)
        if other is not None:
            found[gold_label(settings)] = (key, other)
    return found, skipped


def further_training_beside(retraining: GoldStandard, run: RunDir) -> tuple[dict[str, GoldStandard], list[str]]:
    """The further-training gold standards of `run` (its `gold/`) of the same final
    model and left-out / test instances as the retraining gold standard `retraining`, each over
    the seeds its meta.json lists and verified through :func:`load_gold_standard`: what the
    paper's Figure 11 sets against leave-one-out retraining. Returns ({"<label> <key>": gold
    standard}, [why each candidate was skipped: incomplete, damaged])."""
    found: dict[str, GoldStandard] = {}
    skipped: list[str] = []
    for key, meta, settings, expected in _gold_standards_in(run, skipped):
        if gold_kind(settings) != "further training" or any(
                meta.get(k) != retraining.meta[k] for k in ("final_model", "left_out_indices", "test_indices")):
            continue
        other = _load_beside(run, key, expected, meta.get("seeds"), skipped)
        if other is not None:
            found[f"{gold_label(settings)} {key}"] = other
    return found, skipped


def leave_one_out_beside(meta: dict, run: RunDir) -> tuple[dict[str, tuple[str, GoldStandard]], list[str]]:
    """The leave-one-out gold standards (further training and retraining, any estimator) of
    `run` of the final model and test instances a subset gold standard's `meta` records, each
    over the seeds its meta.json lists and verified through :func:`load_gold_standard`: what
    the linear datamodeling score's evaluation sets beside it (LOO correlation; one over the
    whole training set is itself a linear predictor). Returns ({label: (key, gold standard)},
    [why each candidate was skipped: incomplete, damaged])."""
    found: dict[str, tuple[str, GoldStandard]] = {}
    skipped: list[str] = []
    for key, other_meta, settings, expected in _gold_standards_in(run, skipped):
        if runs_of(settings) != "leave_one_out" or any(
                other_meta.get(k) != meta[k] for k in ("final_model", "test_indices")):
            continue
        other = _load_beside(run, key, expected, other_meta.get("seeds"), skipped)
        if other is not None:
            found[f"{gold_label(settings)} {key}"] = (key, other)
    return found, skipped
