"""Issue 7: the evaluate stage's analyses, against known answers and direct computations."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr

from conftest import compose_config
from tda.artifacts import load_json
from tda.evaluation.curves import (method_agreement, resolve_checkpoints, seed_window_peaks, seed_windows,
                                   similarity_curves, sorted_profile, sorted_scores, split_half_reliability,
                                   top_instances, top_k_overlap)
from tda.evaluation.metrics import mean_and_se, rowwise_cosine, rowwise_spearman
from tda.evaluation.compare import compose_experiment
from tda.evaluation.loading import load_all_method_scores
from tda.further_training.store import GoldStandard, further_training_key, load_gold_standard
from tda.runs import RunDir
from tda.scores import save_method_scores
from tda.stages import attribute, evaluate, train


def synthetic_gold(T=3, n_test=5, n_lo=7, S=10, same_over_checkpoints=False, seed=0) -> GoldStandard:
    g = torch.Generator().manual_seed(seed)
    signal = torch.randn(T, n_test, n_lo, 1, generator=g, dtype=torch.float64)
    diff = signal + 0.5 * torch.randn(T, n_test, n_lo, S, generator=g, dtype=torch.float64)
    if same_over_checkpoints:  # the same attribution at every checkpoint
        diff = diff[:1].expand(T, n_test, n_lo, S)
    diff = diff.contiguous()
    return GoldStandard(diff=diff, full_loss=torch.rand(T, n_test, S, generator=g, dtype=torch.float64),
                        initial_loss=torch.rand(n_test, generator=g, dtype=torch.float64), seeds=list(range(S)),
                        meta={"further_training": {"checkpoint_every_steps": None},
                              "left_out_indices": list(range(100, 100 + n_lo)), "test_indices": list(range(n_test))})


# ------------------------------------------------------------------ metrics vs scipy
def test_rowwise_metrics_match_scipy_with_ties_and_constant_rows():
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 4, (20, 9), generator=g).double()  # many ties
    b = torch.randn(20, 9, generator=g, dtype=torch.float64)
    a[3] = 2.0  # constant: Spearman undefined
    b[5] = 0.0  # zero vector: cosine and Spearman undefined
    cos, sp = rowwise_cosine(a, b), rowwise_spearman(a, b)
    for i in range(20):
        x, y = a[i].numpy(), b[i].numpy()
        ref_cos = x @ y / (np.linalg.norm(x) * np.linalg.norm(y)) if np.linalg.norm(x) * np.linalg.norm(y) > 0 else math.nan
        ref_sp = spearmanr(x, y).statistic if np.ptp(x) > 0 and np.ptp(y) > 0 else math.nan
        assert (math.isnan(ref_cos) and math.isnan(cos[i])) or cos[i].item() == pytest.approx(ref_cos, abs=1e-12)
        assert (math.isnan(ref_sp) and math.isnan(sp[i])) or sp[i].item() == pytest.approx(ref_sp, abs=1e-12)
    mean, se, n, skipped = mean_and_se(sp)
    assert skipped == 2 and n == 18
    ok = sp[~torch.isnan(sp)].numpy()
    assert mean == pytest.approx(ok.mean()) and se == pytest.approx(ok.std(ddof=1) / math.sqrt(18))


# ------------------------------------------------------------------ known answers
@pytest.mark.parametrize("centered", [True, False])
def test_method_equal_to_gold_gives_one_and_negated_minus_one_at_every_checkpoint(centered):
    gold = synthetic_gold(same_over_checkpoints=True)
    target = gold.attribution(center=centered)[0]
    curves = similarity_curves(gold, {"oracle": target.clone(), "anti": -target, "scaled": 3.0 * target},
                               centering=(centered,))
    assert len(curves) == 3 * 2 * 3
    for name, want in (("oracle", 1.0), ("anti", -1.0), ("scaled", 1.0)):
        got = curves[curves.method == name]
        np.testing.assert_allclose(got["mean"], want, atol=1e-12)
        assert (got.n_skipped == 0).all() and (got.n == 5).all()
    assert list(curves.x.unique()) == [1.0, 2.0, 3.0] and (curves.x_name == "epoch").all()


def test_constant_method_rows_are_skipped_and_counted():
    gold = synthetic_gold()
    s = torch.randn(5, 7, dtype=torch.float64)
    s[1] = 0.5  # constant: Spearman undefined, cosine defined
    s[2] = 0.0  # zero: both undefined
    curves = similarity_curves(gold, {"m": s}, centering=(True,))
    assert (curves[curves.metric == "spearman"].n_skipped == 2).all()
    assert (curves[curves.metric == "cosine"].n_skipped == 1).all()


def test_centering_only_changes_the_gold_standard():
    gold = synthetic_gold()
    s = torch.randn(5, 7, dtype=torch.float64)
    curves = similarity_curves(gold, {"m": s})
    for centered in (True, False):
        a = gold.attribution(center=centered)
        direct = [rowwise_cosine(s, a[t]).mean().item() for t in range(3)]
        got = curves[(curves.metric == "cosine") & (curves.centered == centered)].sort_values("checkpoint")["mean"]
        np.testing.assert_allclose(got, direct, rtol=1e-12)


def _direct_curve(diff: np.ndarray, s: np.ndarray, centered: bool) -> np.ndarray:
    """Mean cosine over test instances per checkpoint, straight from the definitions."""
    a = diff - diff.mean(axis=2, keepdims=True) if centered else diff
    a = a.mean(-1)  # [T, n_test, n_lo]
    cos = (a * s).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(s, axis=-1))
    return cos.mean(-1)


def test_seed_windows_match_a_direct_computation():
    gold = synthetic_gold(T=4, S=10, seed=3)
    s = gold.attribution(center=True)[2] + 0.8 * torch.randn(5, 7, dtype=torch.float64)
    assert {k: len(w) for k, w in seed_windows(10, (1, 2, 5, 10, 20)).items()} == {1: 10, 2: 5, 5: 2, 10: 1}
    peaks = seed_window_peaks(lambda c, w: gold.attribution(center=c, seeds=w), 10, {"m": s}, (1, 2, 5, 10, 20))
    assert sorted(peaks.n_seeds_averaged.unique()) == [1, 2, 5, 10]
    diff = gold.diff.numpy()
    for centered in (True, False):
        for k in (1, 2, 5, 10):
            per_window = [_direct_curve(diff[..., i * k:(i + 1) * k], s.numpy(), centered).max() for i in range(10 // k)]
            row = peaks[(peaks.metric == "cosine") & (peaks.centered == centered) & (peaks.n_seeds_averaged == k)].iloc[0]
            assert row.n_windows == 10 // k
            assert row.peak_mean == pytest.approx(np.mean(per_window), rel=1e-12)
            if k < 10:
                assert row.peak_se == pytest.approx(np.std(per_window, ddof=1) / math.sqrt(len(per_window)), rel=1e-10)


def test_split_half_reliability_matches_a_direct_computation():
    gold = synthetic_gold(S=7)
    x_name, xs = gold.checkpoint_axis()
    rel = split_half_reliability(lambda c, w: gold.attribution(center=c, seeds=w), 7, x_name, xs)
    diff = gold.diff.numpy()
    for centered in (True, False):
        a = diff - diff.mean(axis=2, keepdims=True) if centered else diff
        h1, h2 = a[..., :3].mean(-1), a[..., 3:6].mean(-1)  # 7 seeds: halves of 3, the last one unused
        direct = ((h1 * h2).sum(-1) / (np.linalg.norm(h1, axis=-1) * np.linalg.norm(h2, axis=-1))).mean(-1)
        got = rel[(rel.metric == "cosine") & (rel.centered == centered)].sort_values("checkpoint")
        np.testing.assert_allclose(got["mean"], direct, rtol=1e-12)
        assert (got.seeds_per_half == 3).all()
    # identical halves: perfectly reliable
    same = synthetic_gold(S=4)
    same.diff[..., 2:] = same.diff[..., :2]
    rel = split_half_reliability(lambda c, w: same.attribution(center=c, seeds=w), 4, "epoch", [1.0, 2.0, 3.0])
    np.testing.assert_allclose(rel["mean"], 1.0, atol=1e-12)
    np.testing.assert_allclose(rel["ceiling_full"], 1.0, atol=1e-12)


def test_sorted_profile_and_sorted_scores():
    s = torch.tensor([[3.0, -1.0, 0.0], [1.0, 2.0, -4.0]], dtype=torch.float64)
    direct = np.array([[3.0, 0.0, -1.0], [2.0, 1.0, -4.0]]).mean(0)
    np.testing.assert_allclose(sorted_profile(s).numpy(), direct / np.linalg.norm(direct))
    gold = synthetic_gold()
    df = sorted_scores(gold, {"m": s.new_zeros(5, 7) + torch.arange(7.0, dtype=torch.float64)}, [0, 2], (True,))
    g = df[(df.source == "gold standard") & (df.checkpoint == 2)].sort_values("rank")
    np.testing.assert_allclose(g.value, sorted_profile(gold.attribution(center=True)[2]).numpy())
    assert np.linalg.norm(g.value) == pytest.approx(1.0)
    assert (np.diff(g.value) <= 0).all()


def test_resolve_checkpoints():
    assert resolve_checkpoints(["first", "middle", "last", -1, 1], 5) == [0, 2, 4, 1]
    with pytest.raises(ValueError, match="out of range"):
        resolve_checkpoints([7], 5)
    with pytest.raises(ValueError, match="neither an integer"):
        resolve_checkpoints(["peak"], 5)


def test_method_agreement_and_top_instances():
    g = torch.Generator().manual_seed(5)
    s = torch.randn(4, 10, generator=g, dtype=torch.float64)
    agr = method_agreement({"a": s, "b": 2 * s, "c": -s})
    cos = agr[agr.metric == "cosine"].set_index(["method_a", "method_b"])["mean"]
    assert cos[("a", "b")] == pytest.approx(1.0) and cos[("a", "c")] == pytest.approx(-1.0)
    left_out = list(range(50, 60))
    top = top_instances(s, {"same": s, "neg": -s}, [0, 2], left_out, [7, 8, 9, 10], k=3)
    assert len(top) == 2 * 2 * 3 and set(top.test_index) == {7, 9}
    assert top["same:agrees"].all() and not top["neg:agrees"].any()
    helpful = top[(top.test_position == 0) & (top.kind == "helpful")]
    assert list(helpful.train_index) == [50 + j for j in s[0].argsort(descending=True)[:3].tolist()]
    assert list(helpful["same:rank"]) == [1, 2, 3]
    assert top_k_overlap(s, s, 3) == (1.0, 1.0) and top_k_overlap(s, -s, 3) == (0.0, 0.0)


# ------------------------------------------------------------------ the stage on disk
def _write_method(run: RunDir, name: str, scores: torch.Tensor, gold: GoldStandard, config: dict) -> None:
    """A method result in the layout the attribute stage writes (scores + record)."""
    d = run.path / "methods" / f"{name}-test"
    header = {"method": name, "config": config, "final_model": gold.meta["final_model"], "shape": list(scores.shape)}
    save_method_scores(d, scores, header, {"seconds": 0.0, "peak_mb": 0.0, "key": d.name,
                                           "left_out_indices": gold.meta["left_out_indices"],
                                           "test_indices": gold.meta["test_indices"]})


def test_evaluate_stage_known_answers_on_disk(tiny):
    run = train(compose_config("train", tiny))
    for method in ("further_training", "grad_dot"):
        attribute(compose_config("attribute", tiny + [f"method={method}"]))
    cfg = compose_config("evaluate", tiny)
    gold = load_gold_standard(run.gold_dir(further_training_key(cfg)))
    last = gold.attribution(center=False)[-1]
    _write_method(run, "oracle", last, gold, {})
    _write_method(run, "anti_oracle", -last, gold, {})
    out = evaluate(cfg)
    curves = pd.read_csv(out / "similarity.csv")
    sel = (curves.metric == "cosine") & (~curves.centered) & (curves.checkpoint == gold.n_checkpoints - 1)
    assert curves[sel & (curves.method == "oracle")]["mean"].item() == pytest.approx(1.0, abs=1e-12)
    assert curves[sel & (curves.method == "anti_oracle")]["mean"].item() == pytest.approx(-1.0, abs=1e-12)
    summary = pd.read_csv(out / "summary.csv")
    assert set(summary.method) == {"oracle", "anti_oracle", "grad_dot"}
    row = summary[(summary.method == "oracle") & (~summary.centered)].iloc[0]
    assert row.peak_cosine == pytest.approx(1.0) and row.peak_checkpoint == gold.n_checkpoints - 1
    assert row.cosine_last == pytest.approx(1.0) and row.top_k_helpful_overlap == pytest.approx(1.0)
    for f in ("similarity.png", "seed_windows.png", "sorted_scores.png", "agreement.png", "report.md", "examples.md",
              "reliability.csv", "seed_windows.csv", "sorted_scores.csv", "agreement.csv", "examples.csv"):
        assert (out / f).is_file(), f
    report = (out / "report.md").read_text()
    assert "![similarity](similarity.png)" in report and "[summary.csv](summary.csv)" in report
    examples = (out / "examples.md").read_text()
    assert "mean radius" in examples and "oracle:agrees" in examples  # tabular: feature names and values
    agr = pd.read_csv(out / "agreement.csv")
    pair = agr[(agr.metric == "cosine") & (agr.method_a.isin(["oracle", "anti_oracle"])) & (agr.method_b.isin(["oracle", "anti_oracle"]))]
    assert pair["mean"].item() == pytest.approx(-1.0)


def test_several_configs_of_one_method_get_readable_labels(tmp_path):
    run, gold = RunDir(tmp_path / "run"), synthetic_gold(n_test=6, n_lo=8)
    final_model = {"weights": "w", "data": "d", "selection": "s", "run": "r"}
    s = torch.randn(6, 8, dtype=torch.float64)
    for damping in (0.1, 10.0):
        header = {"method": "cg", "config": {"damping": damping, "iters": 5}, "final_model": final_model, "shape": [6, 8]}
        save_method_scores(run.path / "methods" / f"cg-{damping}", s * damping, header, {"seconds": 1.0})
    scores, _ = load_all_method_scores(run, final_model, gold)
    assert sorted(scores) == ["cg(damping=0.1)", "cg(damping=10.0)"]


def test_compare_entries_are_composed_after_the_base_overrides(tiny):
    new = compose_experiment(tiny, "further_optimizer=adam further_optimizer.lr=1e-7 further_training.epochs=5")
    assert new.further_optimizer.name == "adam" and new.further_optimizer.lr == 1e-7
    assert new.further_training.epochs == 5 and new.dataset.max_train == 96  # the base overrides are kept
    assert compose_experiment(tiny, "") == compose_config("evaluate", tiny)
    with pytest.raises(ValueError, match=r"entry 'further_training.epoch=5': Could not override 'further_training.epoch'"):
        compose_experiment(tiny, "further_training.epoch=5")
    with pytest.raises(ValueError, match=r"entry 'further_optimizer=adam adam': 'adam' is not a Hydra override"):
        compose_experiment(tiny, "further_optimizer=adam adam")
    with pytest.raises(ValueError, match="outside `python evaluate.py` pass the overrides"):
        evaluate(compose_config("evaluate", tiny + ['evaluate.compare=["seed=0"]']))


@pytest.mark.slow
def test_compare_two_further_optimizers_in_one_figure(tiny):
    train(compose_config("train", tiny))
    for opt in ("sgd", "adam"):
        attribute(compose_config("attribute", tiny + ["method=further_training", f"further_optimizer={opt}"]))
    attribute(compose_config("attribute", tiny + ["method=grad_dot"]))
    tiny = tiny + ["evaluate.examples.n_test=0", "evaluate.seed_windows=[1]"]  # only the curves are compared here
    single = pd.read_csv(evaluate(compose_config("evaluate", tiny + ["further_optimizer=adam"])) / "similarity.csv")
    compare = tiny + ['evaluate.compare=["further_optimizer=sgd","further_optimizer=adam"]']
    out = evaluate(compose_config("evaluate", compare), compare)
    both = pd.read_csv(out / "similarity.csv")
    assert set(both.experiment) == {"further_optimizer=sgd", "further_optimizer=adam"}
    adam = both[both.experiment == "further_optimizer=adam"].drop(columns="experiment").reset_index(drop=True)
    pd.testing.assert_frame_equal(adam, single)
    assert (out / "similarity.png").is_file() and "further_optimizer=adam" in (out / "report.md").read_text()
    # the two gold standards differ, so the two experiments' curves must too
    sgd = both[both.experiment == "further_optimizer=sgd"]["mean"].to_numpy()
    assert not np.allclose(sgd, adam["mean"].to_numpy())


@pytest.mark.slow
def test_image_examples_are_rendered(tiny):
    img = [o for o in tiny if not o.startswith("dataset.")] + ["dataset=digits", "dataset.max_train=120",
                                                                "dataset.max_test=30", "selection.n_left_out=10"]
    train(compose_config("train", img))
    for method in ("further_training", "grad_dot"):
        attribute(compose_config("attribute", img + [f"method={method}", "further_training.epochs=1"]))
    out = evaluate(compose_config("evaluate", img + ["further_training.epochs=1", "evaluate.examples.n_test=1"]))
    sel = load_json(RunDir.from_config(compose_config("evaluate", img)).selection)
    png = out / f"examples_test{sel['test_indices'][0]}.png"
    assert png.is_file() and png.name in (out / "examples.md").read_text()
