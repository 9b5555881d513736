"""Small further-training problems in float64: random tabular, one-hot or image data, a small MLP,
and a composed config with the job that writes its gold standard."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from helpers.config import compose_config
from tda.further_training.gold_standard import FurtherTraining
from tda.further_training.store import GoldStandardSpec
from tda.models.mlp import MLP
from tda.problem import AttributionProblem

F64 = torch.float64


def data(n=37, d=6, n_test=5, classes=3, seed=0, onehot=False, image=False):
    g = torch.Generator().manual_seed(seed)
    if onehot:  # Folktables-like: one-hot blocks plus a standardised column
        blocks = [4, 5, 3]
        cols = [torch.nn.functional.one_hot(torch.randint(0, b, (n + n_test,), generator=g), b) for b in blocks]
        x = torch.cat([*cols, torch.randn(n + n_test, 1, generator=g)], dim=1).to(F64)
    elif image:
        x = torch.randn(n + n_test, 1, 8, 8, generator=g, dtype=F64)
    else:
        x = torch.randn(n + n_test, d, generator=g, dtype=F64)
    y = torch.randint(0, classes, (n + n_test,), generator=g)
    return x[:n], y[:n], x[n:], y[n:]


def mlp(d, classes=3, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    return MLP([d], classes, hidden=(7, 5), dropout=dropout).to(F64)


def toy_problem(ft_overrides, n_left_out=6) -> tuple[DictConfig, AttributionProblem]:
    """(the attribute config with these further-training overrides, a 30-row MLP problem)."""
    cfg = compose_config("attribute", ["further_training.epochs=2", "further_training.batch_size=8",
                                       "further_training.n_seeds=3", "further_training.dtype=float64",
                                       "trainer.progress_bar=false", *ft_overrides])
    x, y, xt, yt = data(n=30)
    problem = AttributionProblem(model=mlp(6), task="classification", x_train=x, y_train=y, x_test=xt, y_test=yt,
                                 left_out_indices=torch.arange(n_left_out) * 5, test_indices=torch.arange(len(xt)))
    return cfg, problem


def job_for(cfg) -> FurtherTraining:
    """The further-training job of a composed config."""
    return FurtherTraining(GoldStandardSpec.from_config(cfg), accelerator=cfg.trainer.accelerator)
