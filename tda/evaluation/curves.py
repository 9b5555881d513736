"""Similarity of each method to the gold standard at every further-training checkpoint."""

from __future__ import annotations

import pandas as pd
import torch

from tda.evaluation.metrics import METRICS, mean_and_se
from tda.further_training.gold_standard import GoldStandard

CURVE_COLUMNS = ["method", "metric", "centered", "checkpoint", "x", "x_name", "mean", "se", "n", "n_skipped"]


def similarity_curves(gold: GoldStandard, scores: dict[str, torch.Tensor],
                      centering: tuple[bool, ...] = (True, False)) -> pd.DataFrame:
    """One row per (method, metric, centring, checkpoint). `scores[name]` is [n_test, n_left_out];
    method scores are never centred, only the gold standard (SPEC §2)."""
    x_name, xs = gold.checkpoint_axis()
    rows = []
    for centered in centering:
        target = gold.attribution(center=centered)  # [T, n_test, n_left_out]
        for name, s in scores.items():
            if s.shape != target.shape[1:]:
                raise ValueError(f"scores of {name} have shape {tuple(s.shape)} but the gold standard has "
                                 f"[n_test, n_left_out] = {tuple(target.shape[1:])}; they were computed for a different selection")
            for metric, fn in METRICS.items():
                for t in range(target.shape[0]):
                    mean, se, n, skipped = mean_and_se(fn(s, target[t]))
                    rows.append([name, metric, centered, t, xs[t], x_name, mean, se, n, skipped])
    return pd.DataFrame(rows, columns=CURVE_COLUMNS)
