"""The subset gold standard and the linear datamodeling score (docs/evaluation.md, "LDS and LOO
correlation"): every run on a subset equals a plain loop that trains a fresh copy on the subset's
rows alone (a DataLoader over them, torch.optim), to 1e-12 in float64, in both engines and split
into blocks; the draw is recorded and checked by content; a re-run computes nothing; the LDS and
the LOO correlation equal scipy's Spearman / Pearson computed by hand (and dattri's `lds`, when
installed); the stages write lds.csv from the files on disk and refuse what cannot be scored."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from helpers.config import compose_config
from helpers.further_training import data, mlp
from scipy.stats import pearsonr, spearmanr
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from tda.artifacts import load_tensors, save_tensors
from tda.config import ConfigError, build
from tda.evaluation.lds import lds, lds_per_test, loo_correlation
from tda.further_training.store import GoldStandardSpec, further_training_key
from tda.further_training.subset_gold import SubsetTraining
from tda.further_training.subset_store import MASKS, load_subset_gold_standard
from tda.further_training.subsets import run_seed
from tda.preflight import check_config
from tda.problem import AttributionProblem
from tda.provenance import ProvenanceError
from tda.runs import RunDir
from tda.stages import attribute, evaluate, train

SUBSETS = ["further_training.runs=subsets", "further_training.subsets.count=5", "further_training.subsets.fraction=0.6",
           "further_training.epochs=2", "further_training.batch_size=4", "further_training.n_seeds=2",
           "further_training.dtype=float64", "further_optimizer.lr=0.05", "trainer.progress_bar=false"]


def toy(overrides=(), task="classification"):
    """(the attribute config, a 23-row MLP problem scoring every training instance): 23 rows at
    fraction 0.6 keep 13, so an epoch of batches of 4 ends with a shorter batch."""
    cfg = compose_config("attribute", [*SUBSETS, *overrides])
    x, y, xt, yt = data(n=23)
    if task == "regression":
        y, yt = x[:, 0] - 2 * x[:, 1], xt[:, 0] - 2 * xt[:, 1]
    problem = AttributionProblem(model=mlp(6, classes=1 if task == "regression" else 3), task=task, x_train=x,
                                 y_train=y, x_test=xt, y_test=yt, left_out_indices=torch.arange(23),
                                 test_indices=torch.arange(len(xt)))
    return cfg, problem


def compute(cfg, problem, gold_dir, load=True, initial_weights=None):
    spec = GoldStandardSpec.from_config(cfg)
    SubsetTraining(spec).run(problem, gold_dir, initial_weights)
    return load_subset_gold_standard(gold_dir, seeds=spec.settings.seeds) if load else None


def plain_loop(cfg, problem, rows: torch.Tensor, seed: int, subset: int, start=None) -> tuple[np.ndarray, np.ndarray]:
    """One model trained on `rows` alone, the obvious way: (margin, loss) [epochs, n_test], or for
    regression (prediction, squared error). `start`: its initial weights (default: the problem's)."""
    model = copy.deepcopy(problem.model)
    if start is not None:
        model.load_state_dict(start)
    regression = problem.task == "regression"
    opt = build(cfg.further_optimizer)([p for p in model.parameters() if p.requires_grad])
    loader = DataLoader(TensorDataset(problem.x_train[rows], problem.y_train[rows]),
                        batch_size=cfg.further_training.batch_size,
                        sampler=RandomSampler(range(len(rows)), generator=torch.Generator().manual_seed(
                            run_seed(seed, subset))))
    margins, losses = [], []
    for _ in range(cfg.further_training.epochs):
        for xb, yb in loader:
            opt.zero_grad()
            (F.mse_loss(model(xb)[:, 0], yb) if regression else F.cross_entropy(model(xb), yb)).backward()
            opt.step()
        with torch.no_grad():
            logits = model(problem.x_test).numpy()
        yt = problem.y_test.numpy()
        if regression:
            margins.append(logits[:, 0])
            losses.append((logits[:, 0] - yt) ** 2)
            continue
        correct = logits[np.arange(len(yt)), yt]
        others = np.where(np.eye(logits.shape[1], dtype=bool)[yt], -np.inf, logits)
        top = others.max(1, keepdims=True)
        margins.append(correct - (top[:, 0] + np.log(np.exp(others - top).sum(1))))
        losses.append(F.cross_entropy(torch.from_numpy(logits), problem.y_test, reduction="none").numpy())
    return np.stack(margins), np.stack(losses)


@pytest.mark.parametrize("engine", ["stacked", "reference"])
def test_every_subset_run_is_a_model_trained_on_its_rows_alone(engine, tmp_path):
    cfg, problem = toy([f"further_training.engine={engine}"])
    gold = compute(cfg, problem, tmp_path / "gold")
    m, n = gold.masks.shape
    assert (m, n) == (5, 23) and gold.masks.sum(1).tolist() == [13] * 5  # ⌊0.6 · 23⌋ rows each
    assert len({tuple(r.tolist()) for r in gold.masks}) == 5
    assert gold.outputs["margin"].shape == (2, 5, 5, 2)  # [epochs, n_test, m, seeds]
    for s, seed in enumerate(gold.seeds):
        for i in range(m):
            margin, loss = plain_loop(cfg, problem, gold.masks[i].nonzero().flatten(), seed, i)
            np.testing.assert_allclose(gold.outputs["margin"][:, :, i, s].numpy(), margin, rtol=0, atol=1e-12)
            np.testing.assert_allclose(gold.outputs["loss"][:, :, i, s].numpy(), loss, rtol=0, atol=1e-12)
    # the draw is the recorded seed's: same seed, same masks; the seeds' runs differ
    assert gold.meta["subsets"] | {"masks_sha256": None} == {"count": 5, "fraction": 0.6, "seed": 0, "size": 13,
                                                             "masks_sha256": None}
    assert not torch.equal(gold.outputs["margin"][..., 0], gold.outputs["margin"][..., 1])


def test_regression_records_the_prediction_and_fresh_weights_start_each_seed(tmp_path):
    """Regression: the prediction and the squared error; `initialisation=per_seed`: each seed's
    runs start from that seed's weights (the stage passes the model built afresh)."""
    cfg, problem = toy(task="regression")
    starts = {seed: mlp(6, classes=1, seed=100 + seed).state_dict() for seed in (0, 1)}
    gold = compute(cfg, problem, tmp_path / "gold", initial_weights=starts.__getitem__)
    assert sorted(gold.outputs) == ["loss", "prediction"]
    for s, seed in enumerate(gold.seeds):
        for i in range(len(gold.masks)):
            prediction, loss = plain_loop(cfg, problem, gold.masks[i].nonzero().flatten(), seed, i, starts[seed])
            np.testing.assert_allclose(gold.outputs["prediction"][:, :, i, s].numpy(), prediction, rtol=0, atol=1e-12)
            np.testing.assert_allclose(gold.outputs["loss"][:, :, i, s].numpy(), loss, rtol=0, atol=1e-12)


def test_blocks_resume_and_provenance(tmp_path):
    cfg, problem = toy()
    whole = compute(cfg, problem, tmp_path / "whole")
    for index in (1, 0):  # two jobs, each one block of the subsets, into one directory
        compute(toy([f"further_training.subsets.block.index={index}", "further_training.subsets.block.count=2"])[0],
                problem, tmp_path / "blocks", load=False)
    blocks = load_subset_gold_standard(tmp_path / "blocks")
    assert torch.equal(blocks.masks, whole.masks)
    assert all(torch.equal(blocks.outputs[k], whole.outputs[k]) for k in whole.outputs)

    files = sorted((tmp_path / "whole").glob("seed_*.safetensors"))
    stamps = [p.stat().st_mtime_ns for p in files]
    compute(cfg, problem, tmp_path / "whole")  # a re-run finds every seed complete
    assert [p.stat().st_mtime_ns for p in files] == stamps

    # another draw put in place of the recorded one is refused on load and by the next job
    masks = load_tensors(tmp_path / "whole" / MASKS)["masks"]
    save_tensors(tmp_path / "whole" / MASKS, {"masks": masks.flip(0)}, metadata={})
    with pytest.raises(ProvenanceError, match="not the draw meta.json records"):
        load_subset_gold_standard(tmp_path / "whole")
    with pytest.raises(ProvenanceError):
        compute(cfg, problem, tmp_path / "whole")
    # a changed draw is another gold standard (its own key)
    assert GoldStandardSpec.from_config(toy(["further_training.subsets.seed=1"])[0]).key != \
        GoldStandardSpec.from_config(cfg).key


def test_lds_and_loo_correlation_equal_scipy_by_hand():
    g = torch.Generator().manual_seed(3)
    n_test, n_train, m = 4, 30, 25
    scores = torch.randn(n_test, n_train, generator=g, dtype=torch.float64)
    masks = torch.rand(m, n_train, generator=g) < 0.5
    truth = scores @ masks.double().T + 3 * torch.randn(n_test, m, generator=g, dtype=torch.float64)
    outputs = torch.stack([truth, -truth])  # two checkpoints
    rows = lds({"m": scores}, masks, {"margin": outputs}, "epoch", [1.0, 2.0])
    for t in range(2):
        by_hand = [spearmanr(scores[z].numpy() @ masks.numpy().T.astype(float), outputs[t, z].numpy()).statistic
                   for z in range(n_test)]
        row = rows[rows.checkpoint == t].iloc[0]
        assert row.metric == "lds_margin" and row.n == n_test
        assert row["mean"] == pytest.approx(np.mean(by_hand), abs=1e-12)
        assert row.se == pytest.approx(np.std(by_hand, ddof=1) / np.sqrt(n_test), abs=1e-12)
    gold = torch.randn(1, n_test, 10, generator=g, dtype=torch.float64)
    left_out = list(range(0, 30, 3))
    loo = loo_correlation({"m": scores}, gold, left_out, "g", "epoch", [1.0])
    by_hand = [pearsonr(scores[z, left_out].numpy(), gold[0, z].numpy()).statistic for z in range(n_test)]
    assert loo["mean"].iloc[0] == pytest.approx(np.mean(by_hand), abs=1e-12)
    with pytest.raises(ValueError, match="selection.n_left_out=null"):
        lds({"m": scores[:, :10]}, masks, {"margin": outputs}, "epoch", [1.0, 2.0])


def test_lds_equals_dattri():
    metric = pytest.importorskip("dattri.metric")
    g = torch.Generator().manual_seed(4)
    scores = torch.randn(6, 40, generator=g, dtype=torch.float64)
    masks = torch.zeros(30, 40, dtype=torch.bool)
    for i in range(30):
        masks[i, torch.randperm(40, generator=g)[:20]] = True
    outputs = torch.randn(6, 30, generator=g, dtype=torch.float64) + scores @ masks.double().T
    indices = masks.nonzero()[:, 1].reshape(30, 20)
    theirs, _ = metric.lds(scores.T, (outputs.T, indices))
    assert torch.allclose(lds_per_test(scores, masks, outputs), theirs.double(), rtol=0, atol=1e-9)


SMALL = ["dataset.max_train=40", "dataset.max_test=20", "train.epochs=2", "train.batch_size=16",
         "selection.n_left_out=null", "selection.n_test=4", "trainer.progress_bar=false", "logger=none",
         "further_training.subsets.count=8"]


def test_stages_write_the_lds_of_the_files_on_disk():
    run = train(compose_config("train", SMALL))
    attribute(compose_config("attribute", [*SMALL, "method=grad_dot"]))
    gold_overrides = [*SMALL, "gold_standard=retraining_subsets"]
    gold_dir = run.gold_dir(further_training_key(compose_config("attribute", gold_overrides)))
    attribute(compose_config("attribute", [*gold_overrides, "method=further_training"]))
    out = evaluate(compose_config("evaluate", gold_overrides))
    gold = load_subset_gold_standard(gold_dir)
    assert gold.kind == "retraining subsets" and gold.n_checkpoints == 2  # the final training's 2 epochs
    (scores_dir,) = RunDir.from_config(compose_config("attribute", SMALL)).method_dirs()
    scores = load_tensors(scores_dir / "scores.safetensors")["scores"].double()
    table = pd.read_csv(out / "lds.csv")
    for t in range(2):
        margin = gold.outputs["margin"][t, :, :, 0].numpy()
        by_hand = [spearmanr(scores[z].numpy() @ gold.masks.numpy().T.astype(float), margin[z]).statistic
                   for z in range(len(margin))]
        row = table[(table.method == "grad_dot") & (table.metric == "lds_margin") & (table.checkpoint == t)]
        assert row["mean"].item() == pytest.approx(np.nanmean(by_hand), abs=1e-12)
    assert {"lds.png", "summary.csv", "report.md", "evaluated.json"} <= {p.name for p in out.iterdir()}


def test_a_selection_that_does_not_cover_the_training_set_is_refused():
    overrides = [*SMALL, "selection.n_left_out=8"]
    train(compose_config("train", overrides))
    with pytest.raises(ConfigError, match="selection.n_left_out=null"):
        attribute(compose_config("attribute", [*overrides, "gold_standard=further_training_subsets",
                                               "method=further_training"]))


@pytest.mark.parametrize("overrides, message", [
    (["further_training.estimator=derivative", "further_training.removal=mask"], "has no derivative estimator"),
    (["further_training.subsets.fraction=1.0"], "strictly between 0 and 1"),
    (["further_training.subsets.block.count=101"], "more blocks than there are subsets"),
    (["further_training.subsets.initialisation=per_seed"], "only retraining"),
    (["further_training.left_out_shard.count=2"], "subsets.block.index / .count instead"),
])
def test_what_a_subset_gold_standard_cannot_be_is_refused_before_any_work(overrides, message):
    cfg = compose_config("attribute", [*SMALL, "gold_standard=further_training_subsets", "method=further_training",
                                       *overrides])
    with pytest.raises(ConfigError, match=message):
        check_config(cfg, "attribute")
