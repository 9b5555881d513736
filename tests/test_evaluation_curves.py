"""The evaluate stage's analyses (tda.evaluation.curves, .top_k, .metrics) against known answers,
scipy and direct computations; method scores holding NaN/inf are refused, never averaged over."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers.evaluation import synthetic_gold
from scipy.stats import spearmanr

from tda.evaluation.curves import (
    method_agreement,
    resolve_checkpoints,
    similarity_curves,
    sorted_profile,
    sorted_scores,
    split_half_reliability,
)
from tda.evaluation.metrics import mean_and_se, rowwise_cosine, rowwise_spearman
from tda.evaluation.top_k import top_instances, top_k_overlap


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
        norms = np.linalg.norm(x) * np.linalg.norm(y)
        ref_cos = x @ y / norms if norms > 0 else math.nan
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
        assert (got.seeds_per_half == 3).all() and (got.projected_seeds == 7).all()  # 3 vs 3, projected to all 7
        r = got["mean"].to_numpy()
        # Spearman–Brown from 3 seeds to the 7 the methods are scored against: m = 7/3
        m = 7 / 3
        np.testing.assert_allclose(got["projected"], np.where(r > 0, np.sqrt(m * r / (1 + (m - 1) * r)), np.nan),
                                   rtol=1e-12)
    # the worked case: 3 seeds, halves of 1, r = .686 -> sqrt(3r / (1 + 2r)) = .931 (not .90 for 2 seeds)
    r = 0.686
    assert abs(math.sqrt(3 * r / (1 + 2 * r)) - 0.9315) < 5e-4
    three = synthetic_gold(S=3)
    rel3 = split_half_reliability(lambda c, w: three.attribution(center=c, seeds=w), 3, "epoch", [1.0, 2.0, 3.0])
    r3 = rel3["mean"].to_numpy()
    assert (rel3.projected_seeds == 3).all()
    np.testing.assert_allclose(rel3["projected"], np.where(r3 > 0, np.sqrt(3 * r3 / (1 + 2 * r3)), np.nan),
                               rtol=1e-12)
    # identical halves: perfectly reliable
    same = synthetic_gold(S=4)
    same.diff[..., 2:] = same.diff[..., :2]
    rel = split_half_reliability(lambda c, w: same.attribution(center=c, seeds=w), 4, "epoch", [1.0, 2.0, 3.0])
    np.testing.assert_allclose(rel["mean"], 1.0, atol=1e-12)
    np.testing.assert_allclose(rel["projected"], 1.0, atol=1e-12)


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


def test_curves_never_compute_spearman_over_nan():
    from tda.evaluation.curves import curve_rows, method_agreement

    target = torch.randn(2, 3, 5, dtype=torch.float64)
    scores = torch.randn(3, 5, dtype=torch.float64)
    assert len(curve_rows(target, {"m": scores})) == 2 * 2  # two metrics, two checkpoints
    scores[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"scores of m hold 1 NaN/inf entries of 15 \(test positions \[0\]\)"):
        curve_rows(target, {"m": scores})
    with pytest.raises(ValueError, match=r"scores of m hold 1 NaN/inf"):
        method_agreement({"m": scores, "other": torch.randn(3, 5, dtype=torch.float64)})
