"""Issue 14, fault injection: finite and sane values, validated selections, and one clear
message instead of a bare traceback. Each case either refuses with a message naming the
problem and the fix, or (for the further-training range check) leaves legitimate runs alone."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from omegaconf import open_dict

from conftest import compose_config
from tda.data.base import DataBundle
from tda.data.sklearn_data import breast_cancer
from tda.further_training.store import further_training_key
from tda.runs import RunDir
from tda.selection import validate_indices
from tda.stages import attribute, evaluate, train
from tda.config import ConfigError


def _no_run_dir(cfg) -> bool:
    return not RunDir.from_config(cfg).path.exists()


# ------------------------------------------------------------------ a user's own loader, damaged
def damaged_breast_cancer(split: str = "train", column: int | None = None, rows: int = 0, value: float = float("nan"),
                          label: float | None = None, regression: bool = False, max_train: int = 96,
                          max_test: int = 40) -> DataBundle:
    """The embedded breast-cancer data as a user's own loader might deliver it: `rows` rows of
    input `column` set to `value` (NaN / inf), or their label set to `label`; `regression`
    turns the label into a float target (task regression, one output)."""
    data = breast_cancer(max_train=max_train, max_test=max_test)
    ds = data.train if split == "train" else data.test
    cols = ds.to_dict()
    x, y = np.asarray(cols["x"], dtype=np.float32), np.asarray(cols["y"], dtype=np.float64 if regression else np.int64)
    if column is not None:
        x[:rows, column] = value
    if label is not None:
        y = y.astype(np.float64)
        y[:rows] = label
    damaged = datasets.Dataset.from_dict({"x": x, "y": y, "raw": cols["raw"]})
    other = data.test if split == "train" else data.train
    if regression:
        other = other.map(lambda r: {"y": float(r["y"])})
    train_ds, test_ds = (damaged, other) if split == "train" else (other, damaged)
    return DataBundle(name="damaged", train=train_ds, test=test_ds, task="regression" if regression else "classification",
                      n_outputs=1 if regression else 2, modality="tabular", feature_names=data.feature_names,
                      class_names=None if regression else data.class_names, info={})


def _damaged_cfg(tiny, **kwargs):
    cfg = compose_config("train", tiny)
    with open_dict(cfg):
        cfg.dataset = {"_target_": "test_faults_values.damaged_breast_cancer", "name": "damaged", **kwargs}
    return cfg


# ------------------------------------------------------------------ 1. NaN / inf / bad labels in the data
def test_nan_input_column_is_refused_at_load_naming_split_feature_and_rows(tiny):
    cfg = _damaged_cfg(tiny, split="train", column=1, rows=3)
    with pytest.raises(ConfigError, match=r"(?s)dataset damaged holds values no model can be trained on:.*"
                                          r"train split: feature 'mean texture' \(column 1\) holds NaN/inf in 3 of 96 rows"
                                          r".*impute the missing values"):
        train(cfg)
    assert _no_run_dir(cfg)  # refused before anything was trained or written


def test_inf_in_a_test_column_is_refused(tiny):
    cfg = _damaged_cfg(tiny, split="test", column=29, rows=1, value=float("inf"))
    with pytest.raises(ConfigError, match=r"test split: feature 'worst fractal dimension' \(column 29\) holds NaN/inf "
                                          r"in 1 of 40 rows"):
        train(cfg)
    assert _no_run_dir(cfg)


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
    ({"label": float("nan"), "rows": 2, "regression": True}, r"train split: 2 of 96 labels \(y\) are NaN/inf"),
], ids=["class-2-of-binary", "class-minus-1", "fractional-class", "nan-regression-target"])
def test_bad_labels_are_refused_at_load(tiny, kwargs, expect):
    cfg = _damaged_cfg(tiny, split="train", **kwargs)
    with pytest.raises(ConfigError, match=expect):
        train(cfg)
    assert _no_run_dir(cfg)


# ------------------------------------------------------------------ 2. final training diverges
def test_non_finite_training_loss_fails_naming_the_step_and_writes_nothing(tiny):
    cfg = compose_config("train", tiny + ["optimizer.lr=1e12"])
    with pytest.raises(FloatingPointError, match=r"final training diverged: the training loss is (nan|inf) at epoch 0, "
                                                 r"step \d+ .*nothing was written\. Lower optimizer\.lr or set "
                                                 r"train\.gradient_clip_val"):
        train(cfg)
    run = RunDir.from_config(cfg)
    assert not run.final_model.exists() and not run.selection.exists()


# ------------------------------------------------------------------ 3. further training leaves the sane range
@pytest.mark.parametrize("lr, why", [
    (3, r"mean test loss up to .*e\+\d+, above [\d.]+ = 10 x the final model's mean test loss [\d.]+ \+ 1"),
    (30, r"NaN/inf test loss"),
], ids=["finite-nonsense", "nan"])
def test_further_training_with_a_far_too_large_lr_is_reported_diverged(tiny, lr, why):
    """lr=3 on the tiny problem gives finite nonsense (mean test losses ~1e139 against 0.56),
    lr=30 NaN: either way the seed is refused, named, and nothing is written for it."""
    train(compose_config("train", tiny))
    cfg = compose_config("attribute", tiny + ["method=further_training", f"further_optimizer.lr={lr}",
                                              "further_training.n_seeds=1"])
    with pytest.raises(FloatingPointError, match=rf"further training diverged \({why}\) for seed 0: the full-data "
                                                 r"run.*Nothing was written for this seed\. Lower further_optimizer\.lr"):
        attribute(cfg)
    gold = RunDir.from_config(cfg).gold_dir(further_training_key(cfg))
    assert not list(gold.glob("seed_*.safetensors"))


def test_sane_range_check_accepts_the_runs_of_a_default_gold_standard(tiny):
    """The same problem at the default further-training lr is untouched: every seed written."""
    train(compose_config("train", tiny))
    cfg = compose_config("attribute", tiny + ["method=further_training"])
    attribute(cfg)
    gold = RunDir.from_config(cfg).gold_dir(further_training_key(cfg))
    assert sorted(p.name for p in gold.glob("seed_*.safetensors")) == ["seed_00000.safetensors", "seed_00001.safetensors"]


def test_sane_range_is_ten_times_the_final_mean_test_loss_plus_one():
    from tda.further_training.gold_standard import FurtherTraining

    initial = torch.tensor([0.1, 0.3], dtype=torch.float64)  # mean 0.2: limit 10 * 0.2 + 1 = 3
    full = torch.full((2, 2), 0.25, dtype=torch.float64)
    lo = torch.full((2, 2, 3), 0.25, dtype=torch.float64)
    lo[1, 0, 1] = 5.9  # one test instance far up, the run's mean 3.075 > 3: diverged
    lo[1, 0, 2] = 5.7  # mean 2.975: a large but legitimate excursion
    with pytest.raises(FloatingPointError, match=r"seed 7: the runs leaving out training instances \[11\]\."):
        FurtherTraining._check_finite(7, full, lo, [10, 11, 12], initial)
    lo[1, 0, 1] = 5.7
    FurtherTraining._check_finite(7, full, lo, [10, 11, 12], initial)


# ------------------------------------------------------------------ 4. selection.json edited
@pytest.mark.parametrize("edit, expect", [
    (lambda s: s["left_out_indices"].__setitem__(0, -1), r"index -1 \(entry 0\) is outside 0\.\.95"),
    (lambda s: s["left_out_indices"].__setitem__(1, s["left_out_indices"][0]), r"index \d+ appears twice \(entry 1\)"),
    (lambda s: s["test_indices"].__setitem__(2, 40), r"index 40 \(entry 2\) is outside 0\.\.39"),
    (lambda s: s["test_indices"].__setitem__(0, 1.0), r"entry 0 is 1\.0 \(float\), not an integer row index"),
    (lambda s: s["test_indices"].__setitem__(0, True), r"entry 0 is True \(bool\), not an integer row index"),
], ids=["negative", "duplicate", "out-of-range", "float", "bool"])
def test_edited_selection_is_refused_naming_index_and_file(tiny, edit, expect):
    """Edited and re-saved with a valid checksum (as a script rewriting it would): each bad
    index is named with the file before any method runs."""
    from tda.artifacts import CHECKSUM_KEY, save_json

    run = train(compose_config("train", tiny))
    selection = {k: v for k, v in json.loads(run.selection.read_text()).items() if k != CHECKSUM_KEY}
    edit(selection)
    save_json(run.selection, selection)
    with pytest.raises(ValueError, match=rf"{expect}.*; restore .*selection\.json as train\.py wrote it"):
        attribute(compose_config("attribute", tiny + ["method=grad_dot"]))
    assert not list((run.path / "methods").rglob("scores.safetensors"))


def test_validate_indices_accepts_a_clean_selection_and_names_the_source():
    assert validate_indices([0, 5, 3], 6, "test indices", "sel.json") == [0, 5, 3]
    with pytest.raises(ValueError, match=r"test indices in sel\.json: index 6 \(entry 1\) is outside 0\.\.5 .*"
                                         r"train\.overwrite=true"):
        validate_indices([0, 6], 6, "test indices", "sel.json")


# ------------------------------------------------------------------ 5. NaN / inf method scores
def test_nan_scores_are_refused_by_evaluate_naming_method_and_count(tiny):
    """Scores with NaN/inf and a checksum that matches them (a writer that checks integrity but
    not finiteness): evaluate refuses instead of skipping the test instances as undefined."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from tda import artifacts

    train(compose_config("train", tiny))
    attribute(compose_config("attribute", tiny + ["method=further_training"]))
    out = attribute(compose_config("attribute", tiny + ["method=grad_dot"]))
    path = out / "scores.safetensors"
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    scores = load_file(str(path))
    scores["scores"][1, 2] = float("nan")
    scores["scores"][3, 0] = float("inf")
    header[artifacts._HEADER_CHECKSUM] = artifacts.tensor_checksum(scores)
    save_file(scores, str(path), metadata=header)
    record = {k: v for k, v in json.loads((out / "record.json").read_text()).items() if k != artifacts.CHECKSUM_KEY}
    artifacts.save_json(out / "record.json", record | {"scores_sha256": header[artifacts._HEADER_CHECKSUM]})
    with pytest.raises(ValueError, match=r"scores of grad_dot hold 2 NaN/inf entries of 48 \(test positions \[1, 3\]\)"):
        evaluate(compose_config("evaluate", tiny))


def test_curves_never_compute_spearman_over_nan():
    from tda.evaluation.curves import curve_rows, method_agreement

    target = torch.randn(2, 3, 5, dtype=torch.float64)
    scores = torch.randn(3, 5, dtype=torch.float64)
    assert len(curve_rows(target, {"m": scores})) == 2 * 2  # two metrics, two checkpoints
    scores[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"scores of m hold 1 NaN/inf entries of 15 \(test positions \[0\]\)"):
        curve_rows(target, {"m": scores})
    with pytest.raises(ValueError, match=r"scores of m hold 1 NaN/inf"):
        method_agreement({"m": scores, "other": torch.randn(3, 5, dtype=torch.float64)})


# ------------------------------------------------------------------ 6. bare tracebacks become messages
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
    assert _no_run_dir(cfg)


def test_cnn_on_tabular_data_is_refused_before_training(tiny):
    cfg = compose_config("train", tiny + ["model=small_cnn"])
    with pytest.raises(ConfigError, match=r"model=small_cnn needs image inputs \[C, H, W\], but dataset breast_cancer "
                                          r"is tabular data with inputs of shape \[30\]; use model=mlp"):
        train(cfg)
    assert _no_run_dir(cfg)


def test_cnn_constructor_names_the_input_shape():
    from tda.models.cnn import SmallCNN
    from tda.models.resnet9 import ResNet9

    for cls, name in ((SmallCNN, "small_cnn"), (ResNet9, "resnet9")):
        with pytest.raises(ValueError, match=rf"model {name} needs image \[C, H, W\] inputs, but the data's inputs have "
                                             r"shape \[30\]; use model=mlp"):
            cls([30], 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_requested_without_cuda_is_one_message(tiny):
    cfg = compose_config("train", tiny + ["trainer.accelerator=gpu"])
    with pytest.raises(ConfigError, match=r"trainer.accelerator=gpu asks for a CUDA GPU, but torch.cuda.is_available\(\) "
                                          r"is false .*use trainer.accelerator=cpu"):
        train(cfg)
    assert _no_run_dir(cfg)
    run = train(compose_config("train", tiny + ["trainer.attribution_device=cuda"]))  # training does not need it
    assert run.final_model.is_file()
    with pytest.raises(ConfigError, match=r"trainer.attribution_device=cuda asks for a CUDA GPU, but "
                                          r"torch.cuda.is_available\(\) is false .*use trainer.attribution_device=cpu"):
        attribute(compose_config("attribute", tiny + ["trainer.attribution_device=cuda", "method=grad_dot"]))


def test_train_py_exits_non_zero_on_a_diverged_final_training(tmp_path):
    """The entry point, as a scheduler runs it: non-zero exit, the message, no final model."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "dataset.max_train=96", "dataset.max_test=40",
                           "train.epochs=3", "logger=none", "trainer.progress_bar=false", "optimizer.lr=1e12"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "final training diverged" in proc.stderr and "train.gradient_clip_val" in proc.stderr
    assert not list((tmp_path / "runs").rglob("final_model.safetensors"))


def test_data_dir_that_does_not_exist_is_refused_not_downloaded(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("TDA_DATA_DIR", str(tmp_path / "typo"))
    cfg = compose_config("train", tiny + ["dataset=acs_ma2018"])
    with pytest.raises(FileNotFoundError, match=r"TDA_DATA_DIR=.*typo does not exist .*unset it to download"):
        train(cfg)
    assert not RunDir.from_config(cfg).path.exists()
