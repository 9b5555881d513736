"""Issue 8, bad input: every mistake gets one message naming the problem and the fix, before
any long work starts (no run directory is created, no model is trained)."""

from __future__ import annotations

import shutil

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import open_dict

from conftest import SHARED_DATA, compose_config
from tda.artifacts import IntegrityError
from tda.config import ConfigError
from tda.data.errors import loading_errors
from tda.provenance import ProvenanceError
from tda.runs import RunDir
from tda.stages import attribute, evaluate, train


def _no_run_dir(cfg) -> bool:
    return not RunDir.from_config(cfg).path.exists()


# ------------------------------------------------------------------ Hydra: groups and keys
@pytest.mark.parametrize("override, name", [("method=grad_dott", "grad_dott"), ("dataset=breast_cancr", "breast_cancr"),
                                            ("optimizer=sgdd", "sgdd"), ("model=mlpp", "mlpp")])
def test_unknown_group_option_names_it_and_the_options(tiny, override, name):
    with pytest.raises(MissingConfigException) as err:
        compose_config("train", tiny + [override])
    assert name in str(err.value) and "Available options" in str(err.value)


@pytest.mark.parametrize("override", ["train.epochz=3", "selection.n_left_ou=3", "optimizer.lrr=0.1"])
def test_misspelled_key_is_rejected_by_hydra(tiny, override):
    with pytest.raises(ConfigCompositionException, match=override.split("=")[0].split(".")[-1]):
        compose_config("train", tiny + [override])


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
    assert _no_run_dir(cfg)


# ------------------------------------------------------------------ types and values
@pytest.mark.parametrize("override, expect", [
    ("train.epochs=abc", r"train.epochs='abc' is a str, but it must be a int"),
    ("train.epochs=2.5", r"train.epochs=2.5 is a float, but it must be a int"),
    ("optimizer.lr=fast", r"optimizer.lr='fast' is a str, but it must be a float"),
    ("train.overwrite=maybe", r"train.overwrite='maybe' is a str, but it must be a bool"),
    ("further_training.removal=dropp", r"further_training.removal='dropp' is not one of \['drop', 'downweight', 'mask'\]"),
    ("optimizer.lr=-0.1", r"optimizer.lr=-0.1 must be positive; e.g. optimizer.lr=1e-3"),
    ("further_optimizer.lr=0", r"further_optimizer.lr=0 must be positive"),
    ("further_training.n_seeds=0", r"further_training.n_seeds=0 must be positive; the gold standard averages"),
    ("train.epochs=0", r"train.epochs=0 must be positive; train for at least one epoch"),
    ("further_training.epochs=0", r"further_training.epochs=0 must be positive"),
    ("further_training.batch_size=-4", r"further_training.batch_size=-4 must be positive"),
    ("selection.n_left_out=0", r"selection.n_left_out=0 must be positive"),
    ("optimizer.momentum=-0.9", r"optimizer.momentum=-0.9 must not be negative"),
    ("dataset.test_size=1.5", r"dataset.test_size=1.5 must be below 1"),
    ("model.dropout=1.0", r"model.dropout=1.0 must be below 1"),
    ("model.hidden=[128,0]", r"model.hidden=\[128, 0\] must be a list of positive layer widths"),
    ("optimizer.lr=nan", r"optimizer.lr=nan is not a finite number"),
])
def test_wrong_type_or_impossible_value(tiny, override, expect):
    cfg = compose_config("train", tiny + [override])
    with pytest.raises(ConfigError, match=expect):
        train(cfg)
    assert _no_run_dir(cfg)


@pytest.mark.parametrize("override", ["trainer.devices=auto", "trainer.devices=[0]", "further_training.sparse_input=true",
                                      "selection.n_left_out=null", "optimizer.lr=1", "further_training.epsilon=0.01"])
def test_valid_values_of_other_kinds_pass(tiny, override):
    from tda.preflight import check_config

    check_config(compose_config("train", tiny + [override]), "train")


def test_every_problem_in_one_message(tiny):
    cfg = compose_config("attribute", tiny + ["optimizer.lr=-1", "further_training.n_seeds=0", "+train.epochz=1"])
    with pytest.raises(ConfigError) as err:
        attribute(cfg)
    text = str(err.value)
    assert "attribute stage" in text and "optimizer.lr=-1" in text and "n_seeds=0" in text and "train.epochz" in text


def test_optimizer_betas_checked(tiny):
    cfg = compose_config("train", tiny + ["optimizer=adam", "optimizer.betas=[0.9,1.5]"])
    with pytest.raises(ConfigError, match=r"optimizer.betas=\[0.9, 1.5\] must be two numbers in \[0, 1\)"):
        train(cfg)


def test_defaults_and_every_option_pass_validation(tiny):
    """The checks must not reject any shipped configuration."""
    from hydra import compose, initialize_config_dir

    from tda.resources import config_dir
    from tda.preflight import check_config

    CONF_DIR = config_dir()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for group in ("dataset", "model", "optimizer", "further_optimizer", "method", "logger", "experiment"):
            for option in sorted((CONF_DIR / group).glob("*.yaml")):
                check_config(compose(config_name="attribute", overrides=tiny + [f"{group}={option.stem}"]), "attribute")
        for stage in ("train", "evaluate"):
            check_config(compose(config_name=stage, overrides=tiny), stage)


# ------------------------------------------------------------------ checks that need the data
def test_more_left_out_instances_than_training_rows(tiny):
    cfg = compose_config("train", tiny + ["selection.n_left_out=500"])  # TINY keeps 96 training rows
    with pytest.raises(ConfigError, match=r"selection.n_left_out=500 asks for more left-out instances than the 96 "
                                          r"training rows of breast_cancer; lower it"):
        train(cfg)
    assert _no_run_dir(cfg)


def test_more_test_instances_than_test_rows(tiny):
    cfg = compose_config("train", tiny + ["selection.n_test=41"])  # TINY keeps 40 test rows
    with pytest.raises(ConfigError, match=r"selection.n_test=41 asks for more test instances than the 40"):
        train(cfg)


@pytest.mark.skipif(not (SHARED_DATA / "acs_ma2018" / "data_dictionary.json").is_file(), reason="no ACS excerpt")
@pytest.mark.parametrize("content", ["", "AGEP,PINCP,PWGTP,EDU,MSP,INDP,SEX,RAC1P\n"], ids=["empty", "header-only"])
def test_empty_data_file(tiny, tmp_path, content):
    root = tmp_path / "acs"
    root.mkdir()
    (root / "ma2018.csv").write_text(content)
    shutil.copy(SHARED_DATA / "acs_ma2018" / "data_dictionary.json", root / "data_dictionary.json")
    cfg = compose_config("train", tiny)
    with open_dict(cfg):
        cfg.dataset = {"_target_": "tda.data.acs.acs_ma2018", "name": "acs_ma2018", "root": str(root),
                       "max_train": 96, "max_test": 40}
    with pytest.raises(ConfigError, match="acs_ma2018.*(is empty|no training rows|no rows)"):
        train(cfg)
    assert _no_run_dir(cfg)


def test_dataset_that_needs_a_download_while_offline(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("TDA_OFFLINE", "1")
    (tmp_path / "no_data_here").mkdir()  # a data folder without this dataset
    monkeypatch.setenv("TDA_DATA_DIR", str(tmp_path / "no_data_here"))
    cfg = compose_config("train", tiny)
    with open_dict(cfg):
        cfg.dataset = {"_target_": "tda.data.folktables.folktables_income", "name": "folktables",
                       "download_dir": str(tmp_path / "dl"), "max_train": 96, "max_test": 40}
    with pytest.raises(FileNotFoundError, match="offline.*dataset.root="):
        train(cfg)
    assert _no_run_dir(cfg)


def test_hub_download_while_offline_gets_the_fix(tmp_path, monkeypatch):
    """A raw Hugging Face failure in offline mode becomes a message with the fix."""
    import datasets

    import huggingface_hub

    # both libraries read the offline variables when first imported (before the fixture set them)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = compose_config("train", ["dataset=breast_cancer"])
    with pytest.raises(ConfigError, match="needs a download, but offline mode is on.*dataset.root"):
        with loading_errors(cfg.dataset.name):
            datasets.load_dataset("uoft-cs/cifar10", cache_dir=str(tmp_path / "cache"))


# ------------------------------------------------------------------ final model
def test_missing_final_model(tiny):
    for stage, fn in (("attribute", attribute), ("evaluate", evaluate)):
        with pytest.raises(FileNotFoundError, match="no final model.*python train.py"):
            fn(compose_config(stage, tiny))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_final_model(tiny, damage):
    run = train(compose_config("train", tiny))
    data = run.final_model.read_bytes()
    run.final_model.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"not a model" * 10, "empty": b""}[damage])
    for stage, fn in (("attribute", attribute), ("evaluate", evaluate), ("train", train)):
        with pytest.raises(IntegrityError, match=r"final model .* is damaged or truncated .*train.overwrite=true"):
            fn(compose_config(stage, tiny + (["method=grad_dot"] if stage == "attribute" else [])))
    if damage == "truncate":
        train(compose_config("train", tiny + ["train.overwrite=true"]))  # the fix the message gives works
        attribute(compose_config("attribute", tiny + ["method=grad_dot"]))


def test_final_model_from_another_config_is_refused(tiny):
    other = train(compose_config("train", tiny + ["model.hidden=[16]"]))
    run = train(compose_config("train", tiny))
    shutil.copy(other.final_model, run.final_model)  # e.g. a hand-copied file
    with pytest.raises(ProvenanceError, match="(?s)refusing to combine the final model.*run: artifact has"):
        attribute(compose_config("attribute", tiny + ["method=grad_dot"]))
