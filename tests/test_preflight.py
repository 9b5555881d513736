"""A stage's pre-flight (tda.preflight.check_config): every mistake in the config gets one message
naming the problem and the fix, all problems in one message, before any long work starts (no run
directory is created, no model is trained); every shipped config passes."""

from __future__ import annotations

import pytest
from helpers.config import compose_config
from helpers.runs import no_run_dir

from tda.config import ConfigError
from tda.preflight import check_config
from tda.stages import attribute, train


# ------------------------------------------------------------------ keys nothing reads
@pytest.mark.parametrize("override, expect", [
    ("+train.epochz=3", "did you mean train.epochs"),
    ("+further_training.n_seed=3", "did you mean further_training.n_seeds"),
    ("+optimizer.lrr=0.1", "did you mean optimizer.lr"),
    ("+model.hiden=[4]", "did you mean model.hidden"),
])
def test_added_key_that_nothing_reads_is_rejected(tiny, override, expect):
    cfg = compose_config("train", tiny + [override])
    with pytest.raises(ConfigError, match=expect):
        train(cfg)
    assert no_run_dir(cfg)


# ------------------------------------------------------------------ types and values
@pytest.mark.parametrize("override, expect", [
    ("train.epochs=abc", r"train.epochs='abc' is a str, but it must be a int"),
    ("train.epochs=2.5", r"train.epochs=2.5 is a float, but it must be a int"),
    ("optimizer.lr=fast", r"optimizer.lr='fast' is a str, but it must be a float"),
    ("train.overwrite=maybe", r"train.overwrite='maybe' is a str, but it must be a bool"),
    ("further_training.removal=dropp",
     r"further_training.removal='dropp' is not one of \['drop', 'downweight', 'mask'\]"),
    ("optimizer.lr=-0.1", r"optimizer.lr=-0.1 must be positive; e.g. optimizer.lr=1e-3"),
    ("further_optimizer.lr=0", r"further_optimizer.lr=0 must be positive"),
    ("further_training.n_seeds=0", r"further_training.n_seeds=0 must be positive; the gold standard averages"),
    ("train.epochs=0", r"train.epochs=0 must be positive; train for at least one epoch"),
    ("further_training.epochs=0", r"further_training.epochs=0 must be positive"),
    ("further_training.batch_size=-4", r"further_training.batch_size=-4 must be positive"),
    ("selection.n_left_out=0", r"selection.n_left_out=0 must be positive"),
    ("optimizer.momentum=-0.9", r"optimizer.momentum=-0.9 must be in \[0, 1\)"),
    ("dataset.test_size=1.5", r"dataset.test_size=1.5 must be below 1"),
    ("model.dropout=1.0", r"model.dropout=1.0 must be below 1"),
    ("model.hidden=[128,0]", r"model.hidden=\[128, 0\] must be a list of positive layer widths"),
    ("optimizer.lr=nan", r"optimizer.lr=nan is not a finite number"),
])
def test_wrong_type_or_impossible_value(tiny, override, expect):
    cfg = compose_config("train", tiny + [override])
    with pytest.raises(ConfigError, match=expect):
        train(cfg)
    assert no_run_dir(cfg)


@pytest.mark.parametrize("override, expect", [
    ("+evaluate.examples.kk=1", r"evaluate.examples.kk is not a setting .* did you mean evaluate.examples.k\?"),
    ("+further_training.left_out_shard.countt=2", r"did you mean further_training.left_out_shard.count\?"),
    ("evaluate.sorted_checkpoints=[first,lastt]", r"evaluate.sorted_checkpoints=\['first', 'lastt'\] is a list, but "
                                                  r"it must be a list of 'first' or 'middle' or 'last' or int"),
    ("further_training.sparse_input=maybe", r"further_training.sparse_input='maybe' is a str, but it must be a "
                                            r"'auto' or bool"),
    ("further_training.engine=stackd", r"further_training.engine='stackd' is not one of \['stacked', 'reference'\]"),
    ("seed=-1", r"seed=-1 must be a non-negative integer"),
])
def test_nested_keys_and_typed_choices_are_checked(tiny, override, expect):
    with pytest.raises(ConfigError, match=expect):
        check_config(compose_config("train", tiny + [override]), "train")


@pytest.mark.parametrize("override, expect", [
    ("evaluate.examples.k=0", r"evaluate.examples.k=0 must be positive; .* set evaluate.examples.n_test=0"),
    ("further_training.max_runs_per_group=-1", r"further_training.max_runs_per_group=-1 must be positive; null trains "
                                               r"as many runs at once as attribution.memory_budget_mb allows"),
    ("further_training.max_runs_per_group=0", r"further_training.max_runs_per_group=0 must be positive"),
    ("train.dtype=16", r"train.dtype=16 is not one of \['float32', 'float64', 'bf16'\]; for mixed precision use "
                       r"train.dtype=bf16"),
])
def test_impossible_setting_is_one_message_before_any_work(tiny, override, expect):
    cfg = compose_config("train", tiny + [override])
    with pytest.raises(ConfigError, match=expect):
        train(cfg)
    assert no_run_dir(cfg)


def test_optimizer_betas_checked(tiny):
    cfg = compose_config("train", tiny + ["optimizer=adam", "optimizer.betas=[0.9,1.5]"])
    with pytest.raises(ConfigError, match=r"optimizer.betas=\[0.9, 1.5\] must be two numbers in \[0, 1\)"):
        train(cfg)


@pytest.mark.parametrize("override", ["trainer.devices=auto", "trainer.devices=[0]",
                                      "further_training.sparse_input=true", "selection.n_left_out=null",
                                      "optimizer.lr=1", "further_training.epsilon=0.01"])
def test_valid_values_of_other_kinds_pass(tiny, override):
    from tda.preflight import check_config

    check_config(compose_config("train", tiny + [override]), "train")


def test_every_problem_in_one_message(tiny):
    cfg = compose_config("attribute", tiny + ["optimizer.lr=-1", "further_training.n_seeds=0", "+train.epochz=1"])
    with pytest.raises(ConfigError) as err:
        attribute(cfg)
    text = str(err.value)
    assert "attribute stage" in text and "optimizer.lr=-1" in text and "n_seeds=0" in text and "train.epochz" in text


def test_defaults_and_every_option_pass_validation(tiny):
    """The checks must not reject any shipped configuration."""
    from hydra import compose, initialize_config_dir

    from tda.preflight import check_config
    from tda.resources import config_dir

    CONF_DIR = config_dir()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for group in ("dataset", "model", "optimizer", "further_optimizer", "method", "logger", "experiment"):
            for option in sorted((CONF_DIR / group).glob("*.yaml")):
                check_config(compose(config_name="attribute", overrides=tiny + [f"{group}={option.stem}"]), "attribute")
        for stage in ("train", "evaluate"):
            check_config(compose(config_name=stage, overrides=tiny), stage)
