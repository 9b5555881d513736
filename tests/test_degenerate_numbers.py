"""Numbers that are well-formed but meaningless (issue 24): similarity of scores of any finite
magnitude, and no top-k figure taken from tie order when a gold standard or a method has no
variation over the left-out instances."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from tda.evaluation.metrics import mean_and_se, rowwise_cosine, rowwise_spearman
from tda.evaluation.top_k import top_k_hits, top_k_overlap


def _pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(6, 40, dtype=torch.float64, generator=g)
    return a, a + 0.5 * torch.randn(6, 40, dtype=torch.float64, generator=g)


def _numpy_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Independent: each row divided by its own norm, computed in long double."""
    a, b = a.astype(np.longdouble), b.astype(np.longdouble)
    return (a * b).sum(-1) / np.sqrt((a * a).sum(-1) * (b * b).sum(-1))


@pytest.mark.parametrize("scale", [1e200, 1e-170, 1e300, 1e-300])
def test_cosine_and_spearman_of_any_finite_magnitude(scale):
    a, b = _pair()
    expected = _numpy_cosine(a.numpy(), b.numpy()).astype(np.float64)
    for x, y in ((a * scale, b), (a, b * scale), (a * scale, b * scale)):
        assert torch.isfinite(x).all() and torch.isfinite(y).all()
        np.testing.assert_allclose(rowwise_cosine(x, y).numpy(), expected, rtol=1e-12)
        rho = np.array([spearmanr(u, v).statistic for u, v in zip(x.numpy(), y.numpy())])
        np.testing.assert_allclose(rowwise_spearman(x, y).numpy(), rho, rtol=1e-12)


def test_cosine_of_ordinary_magnitudes_is_bit_for_bit_the_plain_formula():
    """The rescaling by a power of two is exact: results of earlier evaluations do not move."""
    for seed in range(5):
        a, b = _pair(seed)
        a, b = a * 10.0 ** (seed - 2), b * 3.0
        plain = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
        assert torch.equal(rowwise_cosine(a, b), plain)


def test_a_zero_row_is_undefined_not_a_number_from_nothing():
    a, b = _pair()
    a[2] = 0.0
    cos = rowwise_cosine(a, b)
    assert math.isnan(cos[2]) and torch.isfinite(cos[[0, 1, 3, 4, 5]]).all()
    mean, _, used, skipped = mean_and_se(cos)
    assert (used, skipped) == (5, 1) and math.isfinite(mean)


def test_top_k_of_a_constant_gold_standard_or_method_is_undefined():
    """A gold standard that is exactly zero (e.g. further_optimizer.lr=1e-20) or a method
    whose scores are constant has no top k: precision and recall are NaN for those test
    instances (counted as skipped), never 0/1 from the order of ties."""
    gold, method = _pair()
    gold[1] = 0.0
    method[4] = 7.0
    precision, recall = top_k_hits(gold, method, k=5, m=10, descending=True)
    for v in (precision, recall):
        assert torch.isnan(v[[1, 4]]).all() and not torch.isnan(v[[0, 2, 3, 5]]).any()
        assert mean_and_se(v)[2:] == (4, 2)
    # the others are what the plain definition gives
    for i in (0, 2, 3, 5):
        top_gold = set(gold[i].argsort(descending=True)[:5].tolist())
        top_method = set(method[i].argsort(descending=True)[:5].tolist())
        assert precision[i] == len(top_gold & top_method) / 5


def test_top_k_overlap_skips_constant_rows_and_is_nan_when_none_is_left():
    gold, method = _pair()
    helpful, harmful = top_k_overlap(gold, method, 5)
    assert 0 <= helpful <= 1 and 0 <= harmful <= 1
    assert all(math.isnan(v) for v in top_k_overlap(torch.zeros_like(gold), method, 5))
    kept = top_k_overlap(gold[1:], method[1:], 5)
    gold[0] = 0.0
    assert top_k_overlap(gold, method, 5) == kept


def test_self_influence_with_nan_is_refused_naming_the_training_positions():
    from tda.exits import RefusedError
    from tda.scores import require_finite_scores

    values = torch.arange(30, dtype=torch.float64)
    values[[4, 17]] = float("nan")
    with pytest.raises(RefusedError, match=r"scores of trak hold 2 NaN/inf entries of 30 \(training positions "
                                           r"\[4, 17\]\); the method failed numerically"):
        require_finite_scores("trak", values)
    require_finite_scores("trak", torch.zeros(30))  # constant is finite: reported as undefined, not refused
