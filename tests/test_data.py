"""Datasets (tda.data): the paper's datasets (Folktables ACSIncome, the ACS excerpt, CIFAR-10,
SST-2), online / offline loading, preprocessing and subsampling; data that cannot be loaded (empty
files, downloads while offline, a TDA_DATA_DIR that does not exist) and loaded data no model can be
trained on (NaN/inf inputs, bad labels) are refused with one message naming the problem and the fix."""

from __future__ import annotations

import shutil

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
from helpers.config import SHARED_DATA, compose_config, requires_shared_data
from helpers.data import CODES, FEATURES, write_dictionary, write_pums
from helpers.runs import no_run_dir
from hydra.errors import InstantiationException
from omegaconf import open_dict

from tda.config import ConfigError, build
from tda.data.errors import loading_errors
from tda.runs import RunDir
from tda.stages import train

# hydra's instantiate wraps a loader's FileNotFoundError; its message is kept verbatim
LOAD_ERRORS = (FileNotFoundError, InstantiationException)


# ------------------------------------------------------------------ Folktables, on a test-written PUMS file
@pytest.fixture
def pums_root(tmp_path):
    root = tmp_path / "pums"
    year_dir = root / "2018" / "1-Year"
    year_dir.mkdir(parents=True)
    df = write_pums(year_dir / "psam_p25.csv")
    write_dictionary(year_dir / "PUMS_Data_Dictionary_2018.csv")  # the census name also works
    return root, df


def _kept(df: pd.DataFrame) -> pd.DataFrame:
    return df[(df.AGEP > 16) & (df.PINCP > 100) & (df.WKHP > 0) & (df.PWGTP >= 1)]


def test_folktables_filters_label_and_feature_layout(pums_root):
    root, df = pums_root
    data = build(compose_config("train", ["dataset=folktables", f"dataset.root={root}"]).dataset)
    kept = _kept(df)
    assert len(data.train) + len(data.test) == len(kept)
    assert len(data.test) == int(np.ceil(0.25 * len(kept)))  # 75/25 split
    names = data.feature_names
    assert names[:2] == ["AGEP", "WKHP"]
    # one block per categorical, in ACSIncome's feature order, one column per observed label
    blocks = [n.split("_", 1)[0] for n in names[2:]]
    order = [f for f in FEATURES if f not in ("AGEP", "WKHP")]
    assert blocks == sorted(blocks, key=order.index)
    for var in order:
        labels = {CODES[var][c] for c in CODES[var] if int(c) in set(kept[var].dropna().astype(int))}
        if var == "COW" and kept[var].isna().any():
            labels.add("N/A (not a worker)")
        assert {n.split("_", 1)[1] for n in names[2:] if n.split("_", 1)[0] == var} == labels, var
    # raw (unscaled) values and labels are those of the kept rows
    raw = np.concatenate([np.asarray(data.train["raw"]), np.asarray(data.test["raw"])])
    y = np.concatenate([np.asarray(data.train["y"]), np.asarray(data.test["y"])])
    assert sorted(raw[:, 0]) == sorted(kept.AGEP.astype(float))
    assert sorted(raw[:, 1]) == sorted(kept.WKHP.astype(float))
    assert y.sum() == int((kept.PINCP > 50000).sum())
    onehot = raw[:, 2:]
    assert set(np.unique(onehot)) <= {0.0, 1.0}
    assert np.all(onehot.sum(1) == len(order))  # exactly one label per categorical
    # only AGEP and WKHP are standardised, with training statistics
    x_tr, _ = data.tensors("train")
    raw_tr = torch.tensor(np.asarray(data.train["raw"]))
    assert torch.allclose(x_tr[:, :2].mean(0), torch.zeros(2), atol=1e-5)
    assert torch.allclose(x_tr[:, :2].std(0, unbiased=False), torch.ones(2), atol=1e-4)
    assert torch.equal(x_tr[:, 2:], raw_tr[:, 2:])
    # and each row's label agrees with its own income through the AGEP/WKHP pair
    assert data.describe("train", 0)["label"] in ("<=50K", ">50K")


def test_folktables_offline_without_local_copy_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.delenv("TDA_DATA_DIR", raising=False)
    cfg = compose_config("train", ["dataset=folktables", f"dataset.download_dir={tmp_path / 'dl'}"])
    with pytest.raises(LOAD_ERRORS, match="dataset.root"):
        build(cfg.dataset)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LOAD_ERRORS, match=r"psam_p25\.csv"):
        build(compose_config("train", ["dataset=folktables", f"dataset.root={empty}"]).dataset)


def test_folktables_found_through_tda_data_dir(pums_root, monkeypatch):
    root, df = pums_root
    (root.parent / "folktables").symlink_to(root)
    monkeypatch.setenv("TDA_DATA_DIR", str(root.parent))
    data = build(compose_config("train", ["dataset=folktables", "dataset.max_train=20"]).dataset)
    assert len(data.train) == 20 and data.info["root"].endswith("folktables")


# ------------------------------------------------------------------ the real ACS excerpt
@requires_shared_data("acs_ma2018")
def test_acs_ma2018_task_on_the_real_excerpt():
    data = build(compose_config("train", ["dataset=acs_ma2018"]).dataset)
    raw = pd.read_csv(SHARED_DATA / "acs_ma2018" / "ma2018.csv", na_values=["N"], keep_default_na=False)
    kept = raw[(raw.AGEP > 16) & (raw.PINCP > 100) & (raw.PWGTP >= 1)]
    n = len(data.train) + len(data.test)
    assert n == len(kept) and 5000 < n < 6000
    y = np.concatenate([np.asarray(data.train["y"]), np.asarray(data.test["y"])])
    assert y.sum() == int((kept.PINCP > 50000).sum())
    assert 0.40 < y.mean() < 0.50
    names = data.feature_names
    assert names[0] == "AGEP" and "SEX_Female" in names and "EDU_Bachelors degree" in names
    n_expected = 1 + sum(kept[c].nunique(dropna=True) + int(kept[c].isna().any())
                         for c in ("EDU", "MSP", "INDP", "SEX", "RAC1P"))
    assert len(names) == n_expected == data.input_shape[0]
    x_tr, _ = data.tensors("train")
    assert abs(float(x_tr[:, 0].mean())) < 1e-5 and abs(float(x_tr[:, 0].std(unbiased=False)) - 1) < 1e-4
    stats = data.info["standardised"]["AGEP"]
    assert stats["mean"] == pytest.approx(float(np.asarray(data.train["raw"])[:, 0].mean()))


@requires_shared_data("acs_ma2018")
def test_subsampling_is_seeded_and_dataset_root_overrides(tmp_path, monkeypatch):
    over = ["dataset=acs_ma2018", "dataset.max_train=100", "dataset.max_test=30"]
    a = build(compose_config("train", over).dataset)
    b = build(compose_config("train", over).dataset)
    c = build(compose_config("train", over + ["dataset.subsample_seed=1"]).dataset)
    assert (len(a.train), len(a.test)) == (100, 30)
    assert torch.equal(a.tensors("train")[0], b.tensors("train")[0])
    assert not torch.equal(a.tensors("train")[0], c.tensors("train")[0])
    monkeypatch.delenv("TDA_DATA_DIR", raising=False)
    with pytest.raises(LOAD_ERRORS, match="dataset.root"):
        build(compose_config("train", ["dataset=acs_ma2018"]).dataset)
    d = build(compose_config("train", over + [f"dataset.root={SHARED_DATA / 'acs_ma2018'}"]).dataset)
    assert torch.equal(a.tensors("train")[0], d.tensors("train")[0])
    with pytest.raises(LOAD_ERRORS, match="does not exist"):
        build(compose_config("train", over + [f"dataset.root={tmp_path / 'nowhere'}"]).dataset)


# ------------------------------------------------------------------ CIFAR-10
@requires_shared_data("cifar10")
def test_cifar10_local_parquet_normalised_and_in_order():
    from tda.data.cifar10 import MEAN, STD

    data = build(compose_config("train", ["dataset=cifar10", "dataset.max_test=50"]).dataset)
    assert len(data.train) == 4000 and len(data.test) == 50 and data.input_shape == (3, 32, 32)
    x, y = data.tensors("train", limit=5)
    assert y.tolist() == [6, 9, 9, 4, 1]  # the official first labels of data_batch_1
    pixels = x[0] * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]
    assert torch.allclose(pixels[:, 0, 0] * 255, torch.tensor([59.0, 62.0, 63.0]), atol=1e-3)
    image = np.asarray(data.describe("train", 0)["image"], np.float32) / 255
    assert torch.allclose(pixels.permute(1, 2, 0), torch.from_numpy(image), atol=1e-5)
    assert data.final_training_transform is None


@requires_shared_data("cifar10")
def test_cifar10_flips_only_in_the_final_training_transform():
    data = build(compose_config("train", ["dataset=cifar10", "dataset.max_train=64", "dataset.max_test=8",
                                          "dataset.flip=true"]).dataset)
    plain = build(compose_config("train", ["dataset=cifar10", "dataset.max_train=64", "dataset.max_test=8"]).dataset)
    x, _ = data.tensors("train")
    assert torch.equal(x, plain.tensors("train")[0])  # the stored data are not augmented
    torch.manual_seed(0)
    out = data.final_training_transform(x)
    flipped = torch.tensor([torch.equal(o, xi.flip(-1)) and not torch.equal(o, xi) for o, xi in zip(out, x)])
    same = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert bool((flipped | same).all()) and 10 < int(flipped.sum()) < 54
    torch.manual_seed(0)
    assert torch.equal(out, data.final_training_transform(x))  # seeded


def test_hub_dataset_offline_without_local_copy_names_the_local_path_option(monkeypatch):
    monkeypatch.delenv("TDA_DATA_DIR", raising=False)
    for name in ("cifar10", "sst2"):
        with pytest.raises(LOAD_ERRORS, match=r"dataset\.root=.*TDA_DATA_DIR"):
            build(compose_config("train", [f"dataset={name}"]).dataset)


# ------------------------------------------------------------------ SST-2
@requires_shared_data("sst2")
def test_sst2_tokenised_by_the_models_tokenizer():
    from tda.pretrained import load_tokenizer

    cfg = compose_config("train", ["dataset=sst2", "model=text_classifier", "dataset.max_train=50"])
    assert cfg.dataset.tokenizer == "minilm"
    assert compose_config("train", ["dataset=sst2", "model=text_classifier", "model.encoder=bert_base"]
                          ).dataset.tokenizer == "bert_base"
    data = build(cfg.dataset)
    assert len(data.train) == 50 and len(data.test) == 872  # validation = test role, all of it
    val = pd.read_parquet(SHARED_DATA / "sst2" / "validation.parquet")
    tok = load_tokenizer("minilm")
    x, y = data.tensors("test", limit=3)
    assert y.tolist() == val.label[:3].tolist() and x.dtype == torch.int64
    for i in range(3):
        ids = tok(val.sentence[i], truncation=True, max_length=128)["input_ids"]
        assert x[i, :len(ids)].tolist() == ids and bool((x[i, len(ids):] == tok.pad_token_id).all())
        assert data.describe("test", i)["text"] == val.sentence[i]
    assert x.shape[1] == data.info["padded_length"] <= 128


# ------------------------------------------------------------------ data that cannot be loaded
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
    assert no_run_dir(cfg)


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
    assert no_run_dir(cfg)


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


def test_data_dir_that_does_not_exist_is_refused_not_downloaded(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("TDA_DATA_DIR", str(tmp_path / "typo"))
    cfg = compose_config("train", tiny + ["dataset=acs_ma2018"])
    with pytest.raises(FileNotFoundError, match=r"TDA_DATA_DIR=.*typo does not exist .*unset it to download"):
        train(cfg)
    assert not RunDir.from_config(cfg).path.exists()


# ------------------------------------------------------------------ NaN / inf / bad labels in the data
def _damaged_cfg(tiny, **kwargs):
    cfg = compose_config("train", tiny)
    with open_dict(cfg):
        cfg.dataset = {"_target_": "helpers.data.damaged_breast_cancer", "name": "damaged", **kwargs}
    return cfg


def test_nan_input_column_is_refused_at_load_naming_split_feature_and_rows(tiny):
    cfg = _damaged_cfg(tiny, split="train", column=1, rows=3)
    with pytest.raises(ConfigError, match=r"(?s)dataset damaged holds values no model can be trained on:.*"
                                          r"train split: feature 'mean texture' \(column 1\) holds NaN/inf in 3 of "
                                          r"96 rows.*impute the missing values"):
        train(cfg)
    assert no_run_dir(cfg)  # refused before anything was trained or written


def test_inf_in_a_test_column_is_refused(tiny):
    cfg = _damaged_cfg(tiny, split="test", column=29, rows=1, value="inf")
    with pytest.raises(ConfigError, match=r"test split: feature 'worst fractal dimension' \(column 29\) holds NaN/inf "
                                          r"in 1 of 40 rows"):
        train(cfg)
    assert no_run_dir(cfg)


def test_image_without_feature_names_is_named_by_flat_column():
    from tda.data.sklearn_data import digits

    data = digits(max_train=20, max_test=10)
    x = np.asarray(data.train["x"], dtype=np.float32)
    x[4, 0, 2, 3] = np.nan  # [C, H, W] = [1, 8, 8]: flat column 2 * 8 + 3 = 19
    data.train = datasets.Dataset.from_dict({"x": x, "y": data.train["y"]})
    assert data.value_problems() == ["train split: column 19 of the flattened input holds NaN/inf in 1 of 20 rows"]


@pytest.mark.parametrize("kwargs, expect", [
    ({"label": 2.0, "rows": 4}, r"train split: 4 of 96 class labels \(y\) are outside 0..1 \(the 2 classes\), e.g. 2"),
    ({"label": -1.0, "rows": 1}, r"train split: 1 of 96 class labels \(y\) are outside 0..1"),
    ({"label": 0.5, "rows": 2}, r"train split: 2 of 96 class labels \(y\) are not whole numbers"),
    ({"label": "nan", "rows": 2, "regression": True}, r"train split: 2 of 96 labels \(y\) are NaN/inf"),
], ids=["class-2-of-binary", "class-minus-1", "fractional-class", "nan-regression-target"])
def test_bad_labels_are_refused_at_load(tiny, kwargs, expect):
    cfg = _damaged_cfg(tiny, split="train", **kwargs)
    with pytest.raises(ConfigError, match=expect):
        train(cfg)
    assert no_run_dir(cfg)
