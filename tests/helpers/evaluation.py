"""Inputs for the evaluate stage's tests: a synthetic gold standard, a made-up split-half
reliability table, and compare mode's overrides for one experiment."""

from __future__ import annotations

import pandas as pd
import torch

from tda.evaluation.curves import RELIABILITY_COLUMNS
from tda.further_training.attribution import GoldStandard

COMPARE = ['evaluate.compare=["seed=0"]']  # compare mode, one experiment: the current overrides


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


def reliability_frame(xs=(1.0, 2.0, 3.0)) -> pd.DataFrame:
    """split_half_reliability-shaped rows with made-up values."""
    return pd.DataFrame([[metric, centered, t, x, "epoch", 0.9, 0.01, 6, 0, 2, 4, 0.95]
                         for metric in ("cosine", "spearman") for centered in (True, False) for t, x in enumerate(xs)],
                        columns=RELIABILITY_COLUMNS)
