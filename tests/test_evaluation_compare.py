"""Compare mode (tda.evaluation.compare): each experiment is composed through Hydra's compose API
after the app's own overrides, like the command line; two further-training optimizers in one figure."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from helpers.config import CONF, compose_config
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from tda.config import ConfigError
from tda.evaluation.compare import compose_experiment, running_app_overrides
from tda.stages import attribute, evaluate, train


def test_compare_entries_are_composed_after_the_base_overrides(tiny):
    new = compose_experiment(tiny, "further_optimizer=adam further_optimizer.lr=1e-7 further_training.epochs=5")
    assert new.further_optimizer.name == "adam" and new.further_optimizer.lr == 1e-7
    assert new.further_training.epochs == 5 and new.dataset.max_train == 96  # the base overrides are kept
    assert compose_experiment(tiny, "") == compose_config("evaluate", tiny)
    with pytest.raises(ValueError, match=r"entry 'further_training.epoch=5': Could not override "
                                         r"'further_training.epoch'"):
        compose_experiment(tiny, "further_training.epoch=5")
    with pytest.raises(ValueError, match=r"entry 'further_optimizer=adam adam': 'adam' is not a Hydra override"):
        compose_experiment(tiny, "further_optimizer=adam adam")
    with pytest.raises(ValueError, match="outside `python evaluate.py` pass the overrides"):
        evaluate(compose_config("evaluate", tiny + ['evaluate.compare=["seed=0"]']))


def test_inside_a_hydra_app_the_apps_overrides_and_config_search_path_are_used(tiny):
    app = tiny + ['evaluate.compare=["further_optimizer=adam"]']
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):  # as @hydra.main leaves GlobalHydra
        HydraConfig.instance().set_config(compose("evaluate", overrides=app, return_hydra_config=True))
        try:
            assert running_app_overrides() == app
            sub = compose_experiment(running_app_overrides(), "further_optimizer=adam further_training.epochs=4")
        finally:
            HydraConfig.instance().cfg = None
    assert sub.further_optimizer.name == "adam" and sub.further_training.epochs == 4
    assert sub.dataset.max_train == 96  # the app's own overrides came first
    with pytest.raises(ValueError, match="outside `python evaluate.py`"):
        running_app_overrides()


def test_an_entry_composes_like_the_command_line(tiny):
    """Later overrides win, as on the command line; a value set by the base survives a group swap."""
    sub = compose_experiment(tiny + ["further_optimizer=adam", "further_optimizer.lr=0.5"], "further_optimizer=sgd")
    assert sub.further_optimizer.name == "sgd" and sub.further_optimizer.lr == 0.5
    assert compose_experiment(tiny, "seed=3") == compose_config("evaluate", tiny + ["seed=3"])
    with pytest.raises(ConfigError, match="'further_optimizer=nadam'"):  # a user error: one line, exit 2
        compose_experiment(tiny, "further_optimizer=nadam")


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
