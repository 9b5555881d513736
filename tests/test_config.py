"""Composing conf/ and the helpers of tda.config: Hydra names an unknown group option or key with
the valid ones; a `_target_` node is checked against its constructor when built; a name derived from
a `_target_` is checked like any other name that becomes a path component."""

from __future__ import annotations

import pytest
from helpers.config import compose_config
from hydra.errors import ConfigCompositionException, MissingConfigException

from tda.config import ConfigError, build, node_name


# ------------------------------------------------------------------ Hydra: groups and keys
@pytest.mark.parametrize("override, name", [("method=grad_dott", "grad_dott"), ("dataset=breast_cancr", "breast_cancr"),
                                            ("optimizer=sgdd", "sgdd"), ("model=mlpp", "mlpp")])
def test_unknown_group_option_names_it_and_the_options(tiny, override, name):
    with pytest.raises(MissingConfigException) as err:
        compose_config("train", tiny + [override])
    assert name in str(err.value) and "Available options" in str(err.value)


def test_unknown_method_is_rejected_by_hydra(tiny):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="grad_dott"):
        compose_config("attribute", tiny + ["method=grad_dott"])


@pytest.mark.parametrize("override", ["train.epochz=3", "selection.n_left_ou=3", "optimizer.lrr=0.1"])
def test_misspelled_key_is_rejected_by_hydra(tiny, override):
    with pytest.raises(ConfigCompositionException, match=override.split("=")[0].split(".")[-1]):
        compose_config("train", tiny + [override])


def test_typo_in_override_is_rejected(tiny):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="further_trainnig"):
        compose_config("attribute", tiny + ["further_trainnig.epochs=3"])


# ------------------------------------------------------------------ tda.config
def test_target_node_is_checked_against_its_constructor_when_built():
    with pytest.raises(ConfigError, match=r"optimizer.lrr is not a parameter of torch.optim.SGD — did you mean "
                                          r"optimizer.lr\?"):
        build({"_target_": "torch.optim.SGD", "_partial_": True, "lrr": 0.1}, key="optimizer")
    sgd = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1, "name": "sgd"}
    assert callable(build(sgd, key="optimizer"))


def test_target_derived_name_is_checked_too():
    assert node_name({"_target_": "pkg.module.GradDot"}, key="method") == "graddot"
    with pytest.raises(ConfigError, match=r"method\._target_ \(no method\.name\)='evil/name'.*set method\.name to"):
        node_name({"_target_": "pkg.Evil/Name"}, key="method")
