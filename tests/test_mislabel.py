"""Label noise and mislabel detection (tda.data.label_noise, tda.evaluation.mislabel,
tda.evaluation.evaluate_mislabel):

- the AUC equals a hand-written walk down the ranking (dattri's definition: one instance inspected
  at a time, trapezoid over (false-positive rate, true-positive rate)), scikit-learn's
  `roc_auc_score` (ties counting half) and, when it is installed, dattri's own function;
- the found curve is the mean over every order of tied instances, enumerated;
- label noise flips exactly ⌊fraction · n⌋ training labels to another class, seeded, and refuses
  regression and a fraction that flips nothing;
- end to end on the embedded default: train on flipped labels (recorded in selection.json, another
  run directory), self-influence of the loss baseline and two methods, the gold standard's
  self-effect, and `evaluate.py attribution.target=self` writing the detection table whose numbers
  are those of the self-influence on disk, and logging the same numbers to W&B.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from helpers.config import compose_config
from helpers.wandb import offline_runs, read_offline_run, wandb_on
from sklearn.metrics import roc_auc_score

from tda.artifacts import CHECKSUM_KEY, load_json, save_json
from tda.config import ConfigError, build
from tda.data.label_noise import LabelNoiseSettings, flip_labels, with_label_noise
from tda.evaluation.mislabel import detection_auc, detection_curves, found_curve, mislabel_table
from tda.provenance import ProvenanceError, read_final_model
from tda.runs import RunDir
from tda.scores import load_method_scores
from tda.stages import attribute, evaluate, further_train, train


def _walk_auc(scores: torch.Tensor, flipped: torch.Tensor) -> float:
    """Inspect the instances one at a time from the highest score; the trapezoid of the true-positive
    rate over the false-positive rate after each one (dattri's `mislabel_detection_auc`)."""
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    positives = int(flipped.sum())
    negatives = len(scores) - positives
    tp = fp = 0
    area = prev_fpr = prev_tpr = 0.0
    for i in order:
        tp, fp = tp + bool(flipped[i]), fp + (not bool(flipped[i]))
        fpr, tpr = fp / negatives, tp / positives
        area += (fpr - prev_fpr) * (tpr + prev_tpr) / 2
        prev_fpr, prev_tpr = fpr, tpr
    return area


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_equals_the_walk_down_the_ranking_and_sklearn(seed):
    g = torch.Generator().manual_seed(seed)
    n = 200
    flipped = torch.rand(n, generator=g) < 0.15
    scores = torch.randn(n, generator=g, dtype=torch.float64) + 1.2 * flipped  # flipped ones rank higher
    auc = detection_auc(scores, flipped)
    assert 0.6 < auc < 1
    assert auc == pytest.approx(_walk_auc(scores, flipped), abs=1e-12)
    assert auc == pytest.approx(roc_auc_score(flipped.numpy(), scores.numpy()), abs=1e-12)
    assert detection_auc(-scores, flipped) == pytest.approx(1 - auc, abs=1e-12)
    # ties (a score rounded to a few values): scikit-learn's AUC, ties counting half
    tied = (scores * 2).round()
    assert detection_auc(tied, flipped) == pytest.approx(roc_auc_score(flipped.numpy(), tied.numpy()), abs=1e-12)


def test_auc_equals_dattris():
    dattri = pytest.importorskip("dattri.metric")  # the peer's own function, where it is installed
    g = torch.Generator().manual_seed(3)
    flipped = torch.rand(300, generator=g) < 0.1
    scores = torch.randn(300, generator=g, dtype=torch.float64) + flipped
    auc, _ = dattri.mislabel_detection_auc(scores, flipped.long())
    assert detection_auc(scores, flipped) == pytest.approx(float(auc), abs=1e-6)


def test_auc_needs_both_classes():
    with pytest.raises(ValueError, match="both flipped and clean"):
        detection_auc(torch.arange(4.0), torch.zeros(4, dtype=torch.bool))


def test_found_curve_is_the_mean_over_every_order_of_tied_instances():
    scores = torch.tensor([3.0, 1.0, 2.0, 2.0, 2.0, 0.5, 1.0])
    flipped = torch.tensor([False, True, True, False, True, False, False])
    groups = sorted({float(s) for s in scores}, reverse=True)
    members = [[i for i in range(len(scores)) if float(scores[i]) == s] for s in groups]
    curves = []
    for orders in itertools.product(*[itertools.permutations(m) for m in members]):
        order = [i for part in orders for i in part]
        curves.append([0] + list(np.cumsum([int(flipped[i]) for i in order])))
    expected = torch.tensor(np.mean(curves, axis=0), dtype=torch.float64)
    assert torch.allclose(found_curve(scores, flipped), expected, atol=1e-12)


def test_detection_table_and_curve():
    """found at 5/10/20 % read off a ranking written by hand; the curve's random and oracle rows."""
    n = 40
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[[0, 1, 2, 3, 10, 11, 20, 30]] = True  # 8 flipped
    scores = -torch.arange(n, dtype=torch.float64)  # row 0 first, row 39 last
    table = mislabel_table({"m": scores}, flipped, {"m": {"seconds": 1.5}})
    row = table.iloc[0]
    # 5 % = 2 rows (0, 1): 2 of 8; 10 % = 4 rows: 4 of 8; 20 % = 8 rows (0..7): 4 of 8
    assert (row.found_at_5, row.found_at_10, row.found_at_20) == (0.25, 0.5, 0.5)
    assert row.n_flipped == 8 and row.seconds == 1.5 and row.auc == pytest.approx(_walk_auc(scores, flipped))
    curve = detection_curves({"m": scores}, flipped)
    oracle = curve[curve.method == "oracle"].set_index("inspected").found
    assert oracle[0.1] == 0.5 and oracle[0.2] == 1.0
    random = curve[curve.method == "random"]
    assert np.allclose(random.found, random.inspected)


# ------------------------------------------------------------------ label noise as data
def test_flip_labels_flips_exactly_the_fraction_to_another_class():
    y = np.arange(1000) % 10
    rows, new = flip_labels(y, 10, 0.1, seed=4)
    assert len(rows) == 100 == len(set(rows.tolist())) and np.all(np.diff(rows) > 0)
    assert np.all(new != y[rows]) and np.all((0 <= new) & (new < 10))
    assert len(set((new - y[rows]) % 10)) == 9  # every other class is reached
    again, new_again = flip_labels(y, 10, 0.1, seed=4)
    assert np.array_equal(rows, again) and np.array_equal(new, new_again)
    assert not np.array_equal(rows, flip_labels(y, 10, 0.1, seed=5)[0])
    assert len(flip_labels(y[:10], 10, 0.3, seed=0)[0]) == 3  # ⌊0.3 · 10⌋ despite 0.3 · 10 < 3 in floats


def test_label_noise_flips_training_labels_only_and_refuses_what_it_cannot_flip():
    data = build(compose_config("train", ["dataset.max_train=50"]).dataset, key="dataset")
    noisy = with_label_noise(data, LabelNoiseSettings(fraction=0.2, seed=1))
    before, after = np.array(data.train["y"]), np.array(noisy.train["y"])
    changed = np.flatnonzero(before != after)
    assert changed.tolist() == noisy.label_noise["flipped_indices"] and len(changed) == 10
    assert before[changed].tolist() == noisy.label_noise["original_labels"]
    assert np.array_equal(np.array(data.test["y"]), np.array(noisy.test["y"]))
    assert with_label_noise(data, LabelNoiseSettings()) is data
    with pytest.raises(ConfigError, match=r"flips ⌊0.01 × 50⌋ = 0 of the 50 training labels.*at least 0.02"):
        with_label_noise(data, LabelNoiseSettings(fraction=0.01))
    regression = build(compose_config("train", ["dataset=diabetes"]).dataset, key="dataset")
    with pytest.raises(ConfigError, match=r"diabetes is a regression dataset .* set label_noise.fraction=0"):
        with_label_noise(regression, LabelNoiseSettings(fraction=0.1))


# ------------------------------------------------------------------ end to end
def test_mislabel_detection_end_to_end(tiny, isolated_env):
    noisy = tiny + ["label_noise.fraction=0.2", "label_noise.seed=3"]
    run = train(compose_config("train", noisy))
    assert run.path != RunDir.from_config(compose_config("train", tiny)).path  # noise is part of the run's identity
    noise = load_json(run.selection)["label_noise"]
    assert noise["n_flipped"] == len(noise["flipped_indices"]) == math.floor(0.2 * 96)

    train(compose_config("train", tiny))
    with pytest.raises(ConfigError, match="mislabel detection needs flipped training labels"):
        evaluate(compose_config("evaluate", tiny + ["attribution.target=self"]))

    for method in ("loss", "grad_dot", "cg"):
        attribute(compose_config("attribute", noisy + [f"method={method}", "attribution.target=self"]))
    gold = further_train(compose_config("further_train", noisy + [
        "attribution.target=self", "further_training.estimator=derivative", "further_training.removal=mask"]))
    assert gold.parent == run.path / "self_influence"

    out = evaluate(compose_config("evaluate", wandb_on(noisy) + ["attribution.target=self"]))
    table = pd.read_csv(out / "mislabel.csv")
    assert sorted(table.method) == ["cg", "further_training", "grad_dot", "loss"]
    flipped = torch.zeros(96, dtype=torch.bool)
    flipped[noise["flipped_indices"]] = True
    identity = read_final_model(run).identity
    for d in sorted((run.path / "self_influence").iterdir()):
        scores, record = load_method_scores(d, identity, (96,))
        row = table[table.method == record["method"]].iloc[0]
        assert row.auc == pytest.approx(roc_auc_score(flipped.numpy(), scores.double().numpy()), abs=1e-9)
    for f in ("detection_curve.csv", "self_influence_agreement.csv", "detection.png", "report.md"):
        assert (out / f).is_file()
    assert "found at 10 %" in (out / "report.md").read_text()
    (wb,) = [read_offline_run(d) for d in offline_runs(isolated_env / "runs")]
    for _, r in table.iterrows():
        for column in ("auc", "found_at_5", "found_at_10", "found_at_20"):
            assert wb["summary"][f"mislabel/{r.method}/{column}"] == pytest.approx(r[column], rel=1e-12)
    assert {"tables/mislabel", "tables/detection_curve"} <= set(wb["tables"])

    # the flipped rows are part of the final model's identity: an edited record (re-saved with a
    # valid checksum, as a script rewriting it would) is refused, not read as other flipped rows
    selection = {k: v for k, v in json.loads(run.selection.read_text()).items() if k != CHECKSUM_KEY}
    selection["label_noise"]["flipped_indices"][0] = next(i for i in range(96) if i not in noise["flipped_indices"])
    save_json(run.selection, selection)
    with pytest.raises(ProvenanceError, match=r"selection.json does not belong to the final model .* retrain it"):
        evaluate(compose_config("evaluate", noisy + ["attribution.target=self"]))
