"""The evaluate stage's definitions that decide a comparison with the paper, each against a direct
computation written out here (loops over windows, checkpoints, seeds and test instances with plain
numpy / scipy): both definitions of peak similarity against seeds averaged, the unadjusted gold
standard (eq. 17 without the full-data run), the distance from the start, the class-structure
diagnostic. Then the stage end to end: a tiny regression run (targets and predictions, no classes,
no accuracy) and a classification run whose W&B run holds the new numbers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from helpers.config import compose_config
from helpers.evaluation import synthetic_gold
from helpers.wandb import offline_runs, read_offline_run, wandb_on
from scipy.stats import spearmanr
from sklearn.datasets import load_diabetes

from tda.artifacts import load_tensors_with_metadata
from tda.config import build
from tda.evaluation.curves import seed_window_peaks, seed_windows
from tda.evaluation.diagnostics import adjustment_curves, class_structure, distance_from_start
from tda.further_training.attribution import GoldStandard
from tda.further_training.store import further_training_key, load_gold_standard
from tda.runs import RunDir
from tda.stages import attribute, evaluate, train


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    den = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / den) if den > 0 else math.nan


def _similarity(metric: str, a: np.ndarray, b: np.ndarray) -> float:
    return _cosine(a, b) if metric == "cosine" else float(spearmanr(a, b).statistic)


def _se(values) -> float:
    v = np.asarray(values, dtype=float)
    return float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan


def _wandering_gold(T=4, n_test=4, n_lo=6, S=6, seed=0) -> GoldStandard:
    """A gold standard whose signal changes a little from checkpoint to checkpoint under much
    seed noise, so that windows of seeds peak at different checkpoints."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, n_test, n_lo, 1, generator=g, dtype=torch.float64)
    diff = (base + 0.4 * torch.randn(T, n_test, n_lo, 1, generator=g, dtype=torch.float64)
            + 1.5 * torch.randn(T, n_test, n_lo, S, generator=g, dtype=torch.float64))
    return GoldStandard(diff=diff, full_loss=torch.rand(T, n_test, S, generator=g, dtype=torch.float64),
                        initial_loss=torch.rand(n_test, generator=g, dtype=torch.float64), seeds=list(range(S)),
                        meta={"further_training": {"checkpoint_every_steps": None},
                              "left_out_indices": list(range(n_lo)), "test_indices": list(range(n_test))})


# ------------------------------------------------------------------ peak similarity vs seeds averaged
def _window_curves(diff: np.ndarray, s: np.ndarray, centered: bool, k: int, metric: str) -> np.ndarray:
    """[n_windows, T]: per window of k seeds and checkpoint, the mean over test instances of the
    similarity between the method's scores and the k seeds' averaged (centred) differences."""
    T, n_test, n_lo, S = diff.shape
    curves = np.zeros((S // k, T))
    for w in range(S // k):
        for t in range(T):
            per_test = []
            for z in range(n_test):
                a = np.zeros(n_lo)
                for seed in range(w * k, (w + 1) * k):
                    d = diff[t, z, :, seed]
                    a += (d - d.mean() if centered else d) / k
                per_test.append(_similarity(metric, a, s[z]))
            curves[w, t] = np.mean(per_test)
    return curves


def test_both_peak_definitions_match_a_direct_computation():
    gold = _wandering_gold()
    s = gold.attribution(center=True)[1] + 0.5 * torch.randn(4, 6, generator=torch.Generator().manual_seed(9),
                                                              dtype=torch.float64)
    assert {k: len(w) for k, w in seed_windows(6, (1, 2, 3, 6, 10)).items()} == {1: 6, 2: 3, 3: 2, 6: 1}
    peaks = seed_window_peaks(lambda c, w: gold.attribution(center=c, seeds=w), 6, {"m": s}, (1, 2, 3, 6, 10))
    assert sorted(peaks.n_seeds_averaged.unique()) == [1, 2, 3, 6]
    strictly_apart = 0
    for centered in (True, False):
        for metric in ("cosine", "spearman"):
            for k in (1, 2, 3, 6):
                curves = _window_curves(gold.diff.numpy(), s.numpy(), centered, k, metric)
                row = {r.definition: r for _, r in peaks[(peaks.metric == metric) & (peaks.centered == centered)
                                                         & (peaks.n_seeds_averaged == k)].iterrows()}
                assert list(row) == ["peak_of_mean_curve", "mean_of_window_peaks"]  # the authors' first
                # the authors': average the windows' curves, then the peak over checkpoints
                mean_curve = curves.mean(0)
                t = int(mean_curve.argmax())
                authors = row["peak_of_mean_curve"]
                assert authors.peak_mean == pytest.approx(mean_curve[t], rel=1e-12)
                assert authors.peak_checkpoints == str(t) and authors.n_windows == 6 // k
                if k < 6:
                    assert authors.peak_se == pytest.approx(_se(curves[:, t]), rel=1e-10)
                # each window's own peak, then the mean over windows
                own = row["mean_of_window_peaks"]
                assert own.peak_mean == pytest.approx(curves.max(1).mean(), rel=1e-12)
                assert own.peak_checkpoints == " ".join(str(int(i)) for i in curves.argmax(1))
                if k < 6:
                    assert own.peak_se == pytest.approx(_se(curves.max(1)), rel=1e-10)
                else:  # one window: the two definitions coincide
                    assert own.peak_mean == pytest.approx(authors.peak_mean, rel=1e-12)
                assert own.peak_mean >= authors.peak_mean - 1e-12
                strictly_apart += own.peak_mean > authors.peak_mean + 1e-6
    assert strictly_apart > 0  # the data tell the two definitions apart


# ------------------------------------------------------------------ the unadjusted gold standard
def test_unadjusted_gold_standard_matches_a_direct_computation():
    gold = synthetic_gold(T=3, n_test=4, n_lo=5, S=3, seed=4)
    s = torch.randn(4, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    adj = adjustment_curves(gold, {"m": s})
    diff, full, initial = gold.diff.numpy(), gold.full_loss.numpy(), gold.initial_loss.numpy()
    T, n_test, n_lo, S = diff.shape
    for adjusted in (True, False):
        for t in range(T):
            per_metric = {"cosine": [], "spearman": []}
            for z in range(n_test):
                a = np.zeros(n_lo)
                for seed in range(S):
                    for j in range(n_lo):
                        without_j = diff[t, z, j, seed] + full[t, z, seed]  # loss(D∖j): diff = loss(D∖j) − loss(D)
                        reference = full[t, z, seed] if adjusted else initial[z]  # loss(D) or loss(θᶠ)
                        a[j] += (without_j - reference) / S
                for metric in per_metric:
                    per_metric[metric].append(_similarity(metric, s[z].numpy(), a))
            for metric, values in per_metric.items():
                row = adj[(adj.metric == metric) & (adj.adjusted == adjusted) & (adj.checkpoint == t)].iloc[0]
                assert row["mean"] == pytest.approx(np.mean(values), rel=1e-10, abs=1e-12)
                assert row.se == pytest.approx(_se(values), rel=1e-9)
    cos = adj[adj.metric == "cosine"]
    assert not np.allclose(cos[cos.adjusted]["mean"], cos[~cos.adjusted]["mean"])  # the adjustment matters ...
    sp = adj[adj.metric == "spearman"]
    np.testing.assert_allclose(sp[sp.adjusted]["mean"], sp[~sp.adjusted]["mean"], rtol=1e-12)  # ... not to ranks
    # centring removes the difference (why adjustment.csv compares the uncentred gold standards)
    torch.testing.assert_close(gold.attribution(center=True, adjust=False), gold.attribution(center=True))


# ------------------------------------------------------------------ distance from the start
def test_distance_from_start_mean_and_se_over_seeds():
    gold = synthetic_gold(T=3, S=4)
    assert distance_from_start(gold) is None  # not recorded: said so in report.md, no distance.csv
    dist = torch.rand(3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gold.distance_from_start = dist
    table = distance_from_start(gold)
    for t in range(3):
        row = table[table.checkpoint == t].iloc[0]
        values = [float(dist[t, seed]) for seed in range(4)]
        assert row.x == t + 1 and row["mean"] == pytest.approx(np.mean(values)) and row.n_seeds == 4
        assert row.se == pytest.approx(_se(values))
    gold.distance_from_start = dist[:, :3]
    with pytest.raises(ValueError, match=r"distance_from_start has shape \(3, 3\), expected .* \(3, 4\)"):
        distance_from_start(gold)


# ------------------------------------------------------------------ class structure
def test_class_structure_matches_a_direct_computation():
    gold = synthetic_gold(T=2, n_test=5, n_lo=7, S=3, seed=6)
    y_lo = torch.tensor([0, 1, 2, 0, 1, 0, 2])
    y_te = torch.tensor([0, 2, 1, 3, 0])  # class 3 has no left-out instance: its cosine is undefined
    s = torch.randn(5, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cs = class_structure(gold, {"m": s}, y_lo, y_te)

    def direct(scores: np.ndarray) -> dict[str, list[float]]:
        out = {"same_class": [], "other_class": [], "difference": [], "cosine_same_class": []}
        for z in range(5):
            own = [scores[z, j] for j in range(7) if y_lo[j] == y_te[z]]
            other = [scores[z, j] for j in range(7) if y_lo[j] != y_te[z]]
            if own:
                out["same_class"].append(np.mean(own))
                out["difference"].append(np.mean(own) - np.mean(other))
                indicator = np.array([float(y_lo[j] == y_te[z]) for j in range(7)])
                out["cosine_same_class"].append(np.corrcoef(scores[z], indicator)[0, 1])  # centred cosine
            out["other_class"].append(np.mean(other))
        return out

    def check(row, want):
        for col, values in want.items():
            assert row[col] == pytest.approx(np.mean(values), rel=1e-10), col
            assert row[f"{col}_se"] == pytest.approx(_se(values), rel=1e-9), col
        assert row.n == 4 and row.n_undefined == 1

    check(cs[cs.source == "m"].iloc[0], direct(s.numpy()))
    assert cs[cs.source == "m"].iloc[0].checkpoint == -1  # methods do not depend on the checkpoint
    for centered in (True, False):
        for t in range(2):
            row = cs[(cs.source == "gold standard") & (cs.centered == centered) & (cs.checkpoint == t)].iloc[0]
            check(row, direct(gold.attribution(center=centered)[t].numpy()))
    with pytest.raises(ValueError, match="do not fit the gold standard's 7 left-out and 5 test instances"):
        class_structure(gold, {"m": s}, y_lo[:6], y_te)


# ------------------------------------------------------------------ end to end
def test_regression_evaluation_shows_targets_and_predictions_and_no_classes(tiny):
    reg = tiny + ["dataset=diabetes"]
    run = train(compose_config("train", reg))
    for method in ("further_training", "grad_dot"):
        attribute(compose_config("attribute", reg + [f"method={method}"]))
    cfg = compose_config("evaluate", reg + ["evaluate.examples.n_test=1"])
    out = evaluate(cfg)
    assert not (out / "class_structure.csv").exists() and not (out / "class_structure.png").exists()
    report, examples = (out / "report.md").read_text(), (out / "examples.md").read_text()
    assert "Not computed: this is a regression task (no classes)." in report
    assert "accuracy" not in (report + examples).lower()
    for f in ("adjustment.csv", "adjustment.png", "seed_windows.csv", "similarity.csv"):
        assert (out / f).is_file(), f
    # the first evaluated test instance: its target in the data's original units, and the final model's prediction
    gold = load_gold_standard(run.gold_dir(further_training_key(cfg)))
    test_index = gold.meta["test_indices"][0]
    data = build(cfg.dataset)
    raw = load_diabetes(scaled=False)
    row = np.asarray(data.test[test_index]["raw"], dtype=np.float32)
    (match,) = np.flatnonzero((raw.data.astype(np.float32) == row).all(1))
    weights, _, _ = load_tensors_with_metadata(run.final_model)
    model = build(cfg.model, input_shape=list(data.input_shape), n_outputs=1)
    model.load_state_dict(weights)
    x, _ = data.tensors("test")
    with torch.no_grad():
        output = float(model.eval()(x[test_index:test_index + 1]))
    prediction = output * data.info["target_std"] + data.info["target_mean"]  # the target's original units
    assert f"## Test instance {test_index} (target {raw.target[match]:.4g}, prediction {prediction:.4g})" in examples
    header = next(line for line in examples.splitlines() if line.startswith("| kind |"))
    assert header.endswith("| target | prediction |") and "| label |" not in header


def test_classification_evaluation_writes_and_logs_the_diagnostics(pipeline, tiny, isolated_env):
    cfg = compose_config("evaluate", wandb_on(tiny))
    out = evaluate(cfg)
    gold = load_gold_standard(RunDir.from_config(cfg).gold_dir(further_training_key(cfg)))
    report = (out / "report.md").read_text()
    for section in ("## Adjusted vs unadjusted gold standard", "## Class structure", "## Distance from the start",
                    "peak of the window-averaged curve (authors')", "1 vs 1 seeds", "projected to 2 seeds"):
        assert section in report, section
    for f in ("adjustment.png", "class_structure.png", "seed_windows.png"):
        assert (out / f).is_file() and f"({f})" in report, f
    if gold.distance_from_start is None:
        assert not (out / "distance.csv").exists() and "does not record" in report
    (ev,) = [r for r in map(read_offline_run, offline_runs(isolated_env / "runs"))
             if r["run"]["job_type"] == "evaluate"]
    rows = {r["epoch"]: r for r in ev["history"] if "epoch" in r}
    for _, r in pd.read_csv(out / "adjustment.csv").iterrows():
        key = f"adjustment/{r.metric}_{'adjusted' if r.adjusted else 'unadjusted'}/{r.method}"
        assert rows[r.x][key] == pytest.approx(r["mean"], rel=1e-12) and rows[r.x][key + "/se"] == pytest.approx(r.se)
    structure = pd.read_csv(out / "class_structure.csv")
    assert set(structure.source) == {"gold standard", "grad_dot"}
    for _, r in structure.iterrows():
        if r.source == "gold standard":
            key = f"class_structure/cosine_same_class_{'centered' if r.centered else 'uncentered'}/gold_standard"
            assert rows[r.x][key] == pytest.approx(r.cosine_same_class, rel=1e-12)
        else:
            assert ev["summary"][f"class_structure/cosine_same_class/{r.source}"] == pytest.approx(r.cosine_same_class)
    if (out / "distance.csv").is_file():
        for _, r in pd.read_csv(out / "distance.csv").iterrows():
            assert rows[r.x]["distance_from_start"] == pytest.approx(r["mean"], rel=1e-12)
    peaks = pd.read_csv(out / "seed_windows.csv")
    by_k = {r["seeds_averaged"]: r for r in ev["history"] if "seeds_averaged" in r}
    for _, r in peaks.iterrows():
        key = f"peak_vs_seeds/{r.definition}/{r.metric}_{'centered' if r.centered else 'uncentered'}/{r.method}"
        assert by_k[r.n_seeds_averaged][key] == pytest.approx(r.peak_mean, rel=1e-12)
    assert {"tables/adjustment", "tables/class_structure"} <= set(ev["tables"])
