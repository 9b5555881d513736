"""Every numeric setting has a range checked before anything runs (tda.ranges): a value that is
not finite, of the wrong sign, beyond what numpy or the lock file take, or implying more memory
than the machine has is refused by the stage's pre-flight in one message that names the setting,
says why (with the estimate where there is one) and how to fix it; nothing is written."""

from __future__ import annotations

import math

import pytest
from helpers.config import compose_config
from helpers.runs import no_run_dir

from tda.config import ConfigError
from tda.preflight import check_config
from tda.ranges import COUNT_MAX, SEED_MAX, Range, memory_problem, physical_memory_bytes
from tda.stages import train


def refusal(stage: str, overrides: list[str]) -> str:
    """The pre-flight's message for `overrides` (it must refuse them)."""
    cfg = compose_config(stage, overrides)
    with pytest.raises(ConfigError) as err:
        check_config(cfg, stage)
    return str(err.value)


# (stage, overrides, the setting named, the fix or the reason the message must give)
PLANTED = [
    # guards that could be switched off, and NaN where a number is meant
    ("attribute", ["method=lissa", "method.divergence_factor=1e9"], "method.divergence_factor=1000000000.0",
     "must be in [1, 1000]"),
    ("attribute", ["method=lissa", "method.divergence_factor=1e300"], "method.divergence_factor=1e+300",
     "beyond float32's largest number"),
    ("train", ["optimizer.lr=1e300"], "optimizer.lr=1e+300", "beyond float32's largest number"),
    ("further_train", ["further_training.clip_grad_norm=1e300"], "further_training.clip_grad_norm=1e+300",
     "null disables clipping"),
    ("attribute", ["method=trak", "method.damping=nan"], "method.damping=nan", "is not a finite number"),
    ("attribute", ["method=datainf", "method.c=nan"], "method.c=nan", "is not a finite number"),
    ("attribute", ["method=datainf", "method.c=-1"], "method.c=-1", "must be positive"),
    ("attribute", ["method=cg", "method.tol=2"], "method.tol=2", "e.g. method.tol=1e-06"),
    ("attribute", ["method=lissa", "method.scales=[10,-1]"], "method.scales=[10, -1]", "must hold positive scales"),
    ("attribute", ["method=lissa", "method.depth=0"], "method.depth=0", "must be in [1, 2147483647]"),
    ("attribute", ["method=arnoldi", "method.top_k=-1"], "method.top_k=-1", "eigenpairs kept"),
    ("attribute", ["method=grad_dot", "method.chunk_size=-1"], "method.chunk_size=-1", "must be in [1,"),
    ("attribute", ["method=trak", "method.proj_dim=1000000000000"], "method.proj_dim=1000000000000",
     "more than any job can hold or finish"),
    ("attribute", ["method=trak", "method.damping=-1"], "method.damping=-1", "must be ≥ 0"),
    # sizes with no bound: the gold standard's memory is estimated and said
    ("further_train", ["further_training.n_seeds=1000000000"], "further_training.n_seeds=1000000000",
     "lower further_training.n_seeds"),
    ("train", ["train.epochs=1000000000000"], "train.epochs=1000000000000", f"must be at most {COUNT_MAX}"),
    ("train", ["attribution.memory_budget_mb=1e12"], "attribution.memory_budget_mb=1000000000000.0",
     "this machine's memory"),
    ("train", ["model.hidden=[1000000000000,128]"], "model.hidden=[1000000000000, 128]",
     "use narrower layers"),
    ("train", ["evaluate.top_k=[10,1000000000000]"], "evaluate.top_k=[10, 1000000000000]", "at most"),
    # seeds beyond what numpy, scikit-learn, Lightning and the lock file take
    ("train", [f"seed={SEED_MAX + 1}"], f"seed={SEED_MAX + 1}", "seeds in [0, 2³²−1]"),
    ("train", [f"selection.seed={SEED_MAX}"], f"selection.seed={SEED_MAX}", "drawn with seed + 1"),
    ("train", ["dataset.split_seed=-1"], "dataset.split_seed=-1", "e.g. dataset.split_seed=0"),
    ("further_train", [f"further_training.seed_offset={SEED_MAX - 1}", "further_training.n_seeds=5"],
     f"further_training.seed_offset={SEED_MAX - 1} with n_seeds=5", "lower further_training.seed_offset or n_seeds"),
    # values a model or dataset cannot take, refused before the constructor runs
    ("train", ["model.trainable=last_k", "model.trainable_k=3"], "model.trainable_k=3",
     "lower model.trainable_k or add layers"),
    ("train", ["model.trainable_k=-1"], "model.trainable_k=-1", "blocks trained"),
    ("train", ["dataset=cifar10", "model=resnet9", "model.width=1e6"], "model.width=1000000.0",
     "lower model.width"),
    ("train", ["dataset=cifar10", "model=resnet9", "model.trainable=last_k", "model.trainable_k=4"],
     "model.trainable_k=4", "use model.trainable=all"),
    ("train", ["dataset=cifar10", "dataset.crop_padding=40"], "dataset.crop_padding=40",
     "e.g. dataset.crop_padding=4"),
    ("train", ["optimizer.momentum=1.5"], "optimizer.momentum=1.5", "1 or more never decays"),
    ("train", ["+further_optimizer.dampening=-0.1"], "further_optimizer.dampening=-0.1", "must be in [0, 1]"),
    ("further_train", ["further_training.epsilon=2"], "further_training.epsilon=2", "must be in (0, 1]"),
]


@pytest.mark.parametrize("stage, overrides, setting, fix", PLANTED, ids=[" ".join(p[1]) for p in PLANTED])
def test_planted_fault_names_the_setting_and_the_fix(tiny, stage, overrides, setting, fix):
    message = refusal(stage, tiny + overrides)
    assert setting in message and fix in message, message


def test_refused_before_anything_is_written(tiny):
    cfg = compose_config("train", tiny + ["optimizer.lr=inf", "model.hidden=[1000000000000]"])
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert "optimizer.lr=inf is not a finite number" in str(err.value)
    assert "model.hidden=[1000000000000]" in str(err.value)  # every problem in one message
    assert no_run_dir(cfg)


def test_folktables_year_is_a_survey_year(tiny):
    pytest.importorskip("folktables")
    message = refusal("train", tiny + ["dataset=folktables", "dataset.year=1999"])
    assert "dataset.year=1999 must be in [2014," in message and "e.g. dataset.year=2018" in message


def test_memory_estimate_is_said_in_gib(tiny):
    """The gold standard [checkpoints, n_test, n_left_out, n_seeds] in float64, estimated from the
    selection's sizes before the data is loaded."""
    per_seed = 2 * 6 * 8  # TINY: 2 epochs (a checkpoint each), 6 test and 8 left-out instances
    n_seeds = int(physical_memory_bytes() / 8 / per_seed) + 1
    message = refusal("further_train", tiny + [f"further_training.n_seeds={n_seeds}"])
    assert f"about {8 * per_seed * n_seeds / 2**30:.1f} GiB" in message, message
    assert f"2 checkpoints × 6 test × 8 left-out instances × {n_seeds} seeds in float64" in message
    assert refusal("further_train", tiny + [f"further_training.n_seeds={n_seeds // 2}", "optimizer.lr=-1"]).count(
        "\n  - ") == 1  # half the seeds fit: only the learning rate is refused


def test_range_describes_itself_and_refuses_non_finite():
    r = Range(0, 1, low_open=True, why=" (a fraction)", example=0.5)
    assert r.problem("x", 0.5) is None
    assert r.problem("x", 0) == "x=0 must be in (0, 1] (a fraction); e.g. x=0.5"
    assert r.problem("x", math.nan) == "x=nan is not a finite number; e.g. x=0.5"
    assert r.problem("x", "auto") is None  # not a number: left to the type check
    assert memory_problem("k", 1.0, "w", "fix") is None
    assert "more than this machine's" in memory_problem("k", 2.0**80, "w", "fix")


def test_batchnorm_momentum_on_a_model_without_batch_norm_is_a_config_error():
    """Found by the fault sweep (`python -m benchmarks.settings_faults --run`): a value in range
    that the model cannot take ends in one line, not a traceback."""
    from torch import nn

    from tda.further_training.gold_standard import with_batchnorm_momentum

    with pytest.raises(ConfigError, match=r"further_training.batchnorm_momentum=0.0 is set but the model has no "
                                          r"batch-norm layers; leave it null"):
        with_batchnorm_momentum(nn.Sequential(nn.Linear(3, 2)), 0.0)
    assert with_batchnorm_momentum(model := nn.Linear(3, 2), None) is model


@pytest.mark.parametrize("betas", [[0, 0.999], [0.9, 0]])
def test_adam_betas_written_as_integers_build(tiny, betas):
    """YAML reads `optimizer.betas=[0,0.999]` as an int and a float; the optimizer is built with
    floats (torch's Adam refuses a mix), so a value the range accepts also runs."""
    import torch

    from tda.config import build

    cfg = compose_config("train", tiny + ["optimizer=adam", f"optimizer.betas=[{betas[0]},{betas[1]}]"])
    check_config(cfg, "train")
    opt = build(cfg.optimizer)([torch.nn.Parameter(torch.zeros(2))])
    assert opt.defaults["betas"] == tuple(float(b) for b in betas)
