"""The derivative estimator through the stages: `further_training.estimator=derivative` writes the gold standard
with the derivative engine (forward / reverse mode, `further_training.derivative_mode`) in the
per-seed format of the difference estimator; the evaluate stage's top-k analysis (topk.csv) and
its comparison of gold standards that differ only in estimator / removal (gold_agreement.csv)."""

from __future__ import annotations

import json
import math
import shutil

import pandas as pd
import pytest
import torch
from helpers.config import TINY, compose_config
from helpers.further_training import job_for
from helpers.wandb import offline_runs, read_offline_run, wandb_on

from tda.artifacts import load_tensors_with_metadata
from tda.config import ConfigError
from tda.evaluation.loading import load_all_method_scores
from tda.evaluation.metrics import METRICS
from tda.evaluation.top_k import recall_window, top_k_agreement, top_k_hits, top_k_sizes, top_k_summary
from tda.further_training.attribution import GoldStandard
from tda.further_training.gold_standard import FurtherTraining, derivative_mode
from tda.further_training.store import GoldStandardSpec, further_training_key, load_gold_standard, seed_file
from tda.models.mlp import MLP
from tda.problem import AttributionProblem
from tda.runs import RunDir
from tda.stages import attribute, evaluate, further_train, train

F64 = torch.float64
DERIVATIVE = ["further_training.estimator=derivative", "further_training.removal=mask"]


# ------------------------------------------------------------------ the key
@pytest.mark.parametrize("overrides, key", [
    ([], "sgd-1122fb1a"),
    (TINY, "sgd-46bd435a"),
    (TINY + ["further_training.removal=mask"], "sgd-5012bcd8"),
    (["further_optimizer=adam", "further_training.removal=downweight", "further_training.batchnorm_momentum=0.5"],
     "adam-d1bb81bc"),
    (["experiment=folktables_sgd"], "sgd-3f16ee5e"),
])
def test_existing_gold_standards_keep_their_keys(overrides, key):
    """Keys computed before the estimator existed (recorded from the code of that time): the new
    settings are left out of the key at their defaults; derivative_mode never enters it."""
    assert further_training_key(compose_config("attribute", overrides)) == key
    assert further_training_key(compose_config("attribute", [*overrides, "further_training.estimator=difference",
                                                             "further_training.derivative_mode=reverse"])) == key
    settings = GoldStandardSpec.from_config(compose_config("attribute", overrides)).defining
    assert "estimator" not in settings and "derivative_mode" not in settings


def test_the_estimator_is_part_of_the_key_and_the_mode_is_not():
    base = TINY + DERIVATIVE
    keys = {mode: further_training_key(compose_config("attribute", base + [f"further_training.derivative_mode={mode}"]))
            for mode in ("auto", "forward", "reverse")}
    assert len(set(keys.values())) == 1
    assert keys["auto"] != further_training_key(compose_config("attribute", TINY + ["further_training.removal=mask"]))
    assert GoldStandardSpec.from_config(compose_config("attribute", base)).defining["estimator"] == "derivative"


def test_drop_and_the_reference_engine_are_refused_with_the_fix(tiny):
    with pytest.raises(ConfigError, match=r"estimator=derivative cannot remove by drop .* use "
                                          r"further_training.removal=mask or further_training.removal=downweight"):
        further_train(compose_config("attribute", tiny + ["further_training.estimator=derivative"]))
    with pytest.raises(ConfigError, match="engine=reference is an engine of the difference estimator"):
        further_train(compose_config("attribute", tiny + DERIVATIVE + ["further_training.engine=reference"]))


def test_auto_mode_takes_reverse_for_a_block_larger_than_the_test_set():
    assert derivative_mode("auto", 8, 6) == "reverse" and derivative_mode("auto", 6, 6) == "forward"
    assert derivative_mode("forward", 100, 1) == "forward" and derivative_mode("reverse", 1, 100) == "reverse"


# ------------------------------------------------------------------ the stage
def _tensors(gold_dir, seed=0):
    return load_tensors_with_metadata(seed_file(gold_dir, seed))[:2]


def test_forward_and_reverse_mode_agree_through_the_stage_and_match_the_mask_difference(tiny):
    """float64, the tiny config: forward and reverse mode write the same gold standard (≤ 1e-10)
    in the difference estimator's format; the full-data run is the difference engine's; the
    derivative is the first-order form of the `mask` difference (same direction; scale
    (|B| − 1) / |B|, the secant vs the tangent of the batch's 1 / Σw normalisation)."""
    run = train(compose_config("train", tiny))
    golds = {}
    for mode in ("forward", "reverse"):
        cfg = compose_config("attribute", tiny + DERIVATIVE + [f"further_training.derivative_mode={mode}"])
        out = further_train(cfg)
        tensors, header = _tensors(out)
        assert header["engine"] == "derivative" and header["derivative_mode"] == mode
        assert header["further_training"]["estimator"] == "derivative"
        assert tensors["diff"].shape == (2, 6, 8) and tensors["diff"].dtype == F64
        golds[mode] = load_gold_standard(out)
        shutil.move(out, out.with_name(out.name + f".{mode}"))  # the other mode writes the same directory
    fw, rv = golds["forward"], golds["reverse"]
    assert float(fw.diff.abs().max()) > 1e-6
    assert float((fw.diff - rv.diff).abs().max()) <= 1e-10
    assert float((fw.full_loss - rv.full_loss).abs().max()) <= 1e-12
    assert torch.equal(fw.initial_loss, rv.initial_loss)

    diff_cfg = compose_config("attribute", tiny + ["further_training.removal=mask"])
    difference = load_gold_standard(further_train(diff_cfg))
    assert float((difference.full_loss - fw.full_loss).abs().max()) <= 1e-12
    assert torch.equal(difference.initial_loss, fw.initial_loss)
    a, b = fw.attribution(center=False), difference.attribution(center=False)
    cos = METRICS["cosine"](a.flatten(0, 1), b.flatten(0, 1))
    assert float(cos.min()) >= 0.999, cos
    ratio = a.flatten(0, 1).norm(dim=-1) / b.flatten(0, 1).norm(dim=-1)
    assert torch.allclose(ratio, torch.full_like(ratio, 15 / 16), atol=0.01), ratio  # batch 16
    assert run.path.is_dir()


def _toy(overrides):
    """A 30-row float64 MLP problem and the further-training job of these overrides."""
    cfg = compose_config("attribute", ["further_training.epochs=2", "further_training.batch_size=8",
                                       "further_training.n_seeds=3", "trainer.progress_bar=false", *DERIVATIVE,
                                       *overrides])
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(35, 6, generator=g, dtype=F64), torch.randint(0, 3, (35,), generator=g)
    torch.manual_seed(0)
    model = MLP([6], 3, hidden=(7, 5)).to(F64)
    problem = AttributionProblem(model=model, task="classification", x_train=x[:30], y_train=y[:30], x_test=x[30:],
                                 y_test=y[30:], left_out_indices=torch.arange(6) * 5, test_indices=torch.arange(5))
    return cfg, problem, job_for(cfg)


def test_shards_and_resume_of_the_derivative_estimator(tmp_path, monkeypatch):
    """Left-out shards and seed shards fill one directory and merge to the unsharded gold
    standard; a re-run finds every seed written and computes nothing."""
    _, problem, job = _toy(["further_training.derivative_mode=forward"])
    job.run(problem, tmp_path / "whole")
    for index in (0, 1):
        for seeds in ("[0,2]", "[1]"):
            _, p, j = _toy(["further_training.derivative_mode=reverse", "further_training.left_out_shard.count=2",
                            f"further_training.left_out_shard.index={index}", f"further_training.shard_seeds={seeds}"])
            j.run(p, tmp_path / "sharded")
    assert (tmp_path / "sharded" / "seed_00001.part_02_of_02.safetensors").is_file()
    whole, merged = load_gold_standard(tmp_path / "whole"), load_gold_standard(tmp_path / "sharded")
    assert whole.seeds == merged.seeds == [0, 1, 2]
    assert float((whole.diff - merged.diff).abs().max()) <= 1e-10
    calls = []
    monkeypatch.setattr(FurtherTraining, "_derivative_seed", lambda *a, **k: calls.append(a))
    job.run(problem, tmp_path / "whole")
    assert calls == []


def test_a_diverged_derivative_run_is_named_and_never_written(tmp_path):
    _, problem, job = _toy(["further_optimizer.lr=1e3"])
    with pytest.raises(FloatingPointError, match=r"further training diverged .* for seed 0: the full-data run"):
        job.run(problem, tmp_path)
    assert not seed_file(tmp_path, 0).is_file()


# ------------------------------------------------------------------ top k
def _synthetic_gold(T=3, n_test=5, n=40, S=2, seed=0) -> GoldStandard:
    g = torch.Generator().manual_seed(seed)
    meta = {"further_training": {}, "left_out_indices": list(range(n)), "test_indices": list(range(n_test))}
    return GoldStandard(diff=torch.randn(T, n_test, n, S, generator=g, dtype=F64),
                        full_loss=torch.rand(T, n_test, S, generator=g, dtype=F64),
                        initial_loss=torch.rand(n_test, generator=g, dtype=F64), seeds=list(range(S)), meta=meta)


def test_top_k_matches_a_direct_computation():
    gold = _synthetic_gold()
    g = torch.Generator().manual_seed(1)
    target = gold.attribution(center=False)
    scores = {"noisy": target[-1] + 0.8 * torch.randn(target[-1].shape, generator=g, dtype=F64),
              "oracle": target[1].clone()}
    df = top_k_agreement(gold, scores, ks=(10, 100), within=0.25)
    assert sorted(df.k.unique()) == [10]  # 100 is capped at n_left_out = 40, where both are 1: left out
    assert set(df.m) == {10}  # ⌈0.25 · 40⌉ = 10
    df2 = top_k_agreement(gold, scores, ks=(5,), within=0.25)
    for frame, k, m in ((df, 10, 10), (df2, 5, 10)):
        for name, s in scores.items():
            for kind, sign in (("helpful", 1), ("harmful", -1)):
                for t in range(3):
                    prec, rec = [], []
                    for z in range(5):
                        gold_top = set(sorted(range(40), key=lambda j: -sign * float(target[t, z, j]))[:k])
                        order = sorted(range(40), key=lambda j: -sign * float(s[z, j]))
                        prec.append(len(gold_top & set(order[:k])) / k)
                        rec.append(len(gold_top & set(order[:m])) / k)
                    row = frame[(frame.method == name) & (frame.kind == kind) & (frame.checkpoint == t)].iloc[0]
                    assert row.precision == pytest.approx(sum(prec) / 5, abs=1e-12)
                    assert row.recall == pytest.approx(sum(rec) / 5, abs=1e-12)
                    assert row.m == m and row.n == 5
    oracle = df[(df.method == "oracle") & (df.checkpoint == 1)]
    assert (oracle.precision == 1).all() and (oracle.recall == 1).all()
    assert (df2.recall >= df2.precision).all()
    summary = top_k_summary(df)
    last = df[(df.method == "noisy") & (df.checkpoint == 2) & (df.kind == "harmful")].iloc[0]
    assert summary["noisy"]["precision_at_10_harmful"] == last.precision
    assert summary["noisy"]["recall_10_in_top_m_harmful"] == last.recall


def test_top_k_sizes_and_recall_window():
    assert top_k_sizes([10, 100], 40) == [10] and top_k_sizes([10, 100], 30085) == [10, 100]
    assert top_k_sizes([10, 100], 8) == []
    assert recall_window(10, 30085, 0.1) == 3009 and recall_window(10, 40, 0.1) == 10
    assert recall_window(100, 120, 0.1) == 100
    gold, method = torch.tensor([[3.0, 2.0, 1.0, 0.0]]), torch.tensor([[0.0, 2.0, 1.0, 3.0]])
    # gold's top 2: {0, 1}; the method's order: 3, 1, 2, 0
    assert [h.tolist() for h in top_k_hits(gold, method, 2, 3, True)] == [[0.5], [0.5]]
    assert [h.tolist() for h in top_k_hits(gold, method, 2, 4, True)] == [[0.5], [1.0]]
    assert [h.tolist() for h in top_k_hits(gold, method, 1, 4, False)] == [[0.0], [1.0]]  # harmful: 3, last


def test_top_k_settings_are_checked(tiny):
    from tda.preflight import check_config
    with pytest.raises(ConfigError, match=r"evaluate.top_k=\[0, 10\] must hold positive"):
        check_config(compose_config("evaluate", tiny + ["evaluate.top_k=[0,10]"]), "evaluate")
    with pytest.raises(ConfigError, match="evaluate.top_k_recall_within=1.5 must be in"):
        check_config(compose_config("evaluate", tiny + ["evaluate.top_k_recall_within=1.5"]), "evaluate")


# ------------------------------------------------------------------ end to end
def test_the_gold_standard_of_every_training_instance_end_to_end(tiny):
    """`selection.n_left_out=null further_training.estimator=derivative` (removal mask): the
    left-out set is the whole training set, the gold standard is computed in reverse mode (auto:
    96 instances > 6 test instances), methods score every training instance, and evaluate reports
    precision@k / recall over all of them."""
    o = tiny + ["selection.n_left_out=null", *DERIVATIVE]
    run = train(compose_config("train", o))
    for method in ("further_training", "grad_dot", "grad_cos"):
        attribute(compose_config("attribute", o + [f"method={method}"]))
    cfg = compose_config("evaluate", o)
    gold_dir = run.gold_dir(further_training_key(cfg))
    tensors, header = _tensors(gold_dir)
    assert tensors["diff"].shape == (2, 6, 96) and header["derivative_mode"] == "reverse"
    out = evaluate(cfg)
    topk = pd.read_csv(out / "topk.csv")
    assert set(topk.method) == {"grad_dot", "grad_cos"} and set(topk.k) == {10} and set(topk.kind) == {
        "helpful", "harmful"}
    assert len(topk) == 2 * 2 * 2  # methods x kinds x checkpoints
    gold = load_gold_standard(gold_dir)
    scores, _ = load_all_method_scores(run, gold.meta["final_model"], gold)
    direct = top_k_agreement(gold, scores, (10,), 0.1)
    pd.testing.assert_frame_equal(topk, direct, check_dtype=False)
    summary = pd.read_csv(out / "summary.csv")
    for col in ("precision_at_10_helpful", "precision_at_10_harmful", "recall_10_in_top_m_helpful"):
        assert summary[col].between(0, 1).all(), col
    row = summary[summary.method == "grad_dot"].iloc[0]
    last = topk[(topk.method == "grad_dot") & (topk.kind == "helpful") & (topk.checkpoint == 1)].iloc[0]
    assert row.precision_at_10_helpful == pytest.approx(last.precision)
    report = (out / "report.md").read_text()
    assert "## The gold standard's top k" in report and "**precision@k**" in report
    assert "**derivative estimator**" in report and "[topk.csv](topk.csv)" in report
    assert not (out / "gold_agreement.csv").exists()  # no other gold standard of these settings


def test_gold_agreement_with_the_difference_gold_standards(tiny, isolated_env):
    """A derivative (mask) gold standard beside the `drop` and `downweight` difference gold
    standards of the same settings: evaluate compares them per checkpoint (gold_agreement.csv,
    figure, report, W&B), each value equal to a direct computation; a gold standard with other
    settings is not a sibling, an incomplete one is skipped and named."""
    o = tiny  # W&B only for the evaluate stage (read back below)
    run = train(compose_config("train", o))
    golds = {}
    for label, extra in {"derivative (mask)": DERIVATIVE, "difference (drop)": [],
                         "difference (downweight)": ["further_training.removal=downweight"],
                         "other epochs": ["further_training.epochs=1", "further_training.removal=mask"],
                         "incomplete": ["further_training.removal=mask"]}.items():
        cfg = compose_config("attribute", o + extra + ["method=further_training"])
        golds[label] = (further_training_key(cfg), load_gold_standard(attribute(cfg)))
    seed_file(run.gold_dir(golds["incomplete"][0]), 1).unlink()
    attribute(compose_config("attribute", o + ["method=grad_dot"]))
    out = evaluate(compose_config("evaluate", wandb_on(o) + DERIVATIVE))
    agr = pd.read_csv(out / "gold_agreement.csv")
    assert set(agr.gold) == {"derivative (mask)"}
    assert set(agr.sibling) == {"difference (drop)", "difference (downweight)"}
    assert set(agr.metric) == {"cosine", "spearman", "norm_ratio"} and set(agr.checkpoint) == {0, 1}
    mine = golds["derivative (mask)"][1]
    for _, r in agr.iterrows():
        key, other = golds[r.sibling]
        assert r.sibling_key == key
        a, b = mine.attribution(center=r.centered)[r.checkpoint], other.attribution(center=r.centered)[r.checkpoint]
        want = (a.norm(dim=-1) / b.norm(dim=-1)) if r.metric == "norm_ratio" else METRICS[r.metric](a, b)
        assert r["mean"] == pytest.approx(float(want.mean()), abs=1e-12)
    cos = agr[(agr.metric == "cosine") & agr.centered]
    assert (cos["mean"] > 0.9).all()  # the linearisation holds on this small, slow problem
    assert (out / "gold_agreement.png").is_file()
    report = (out / "report.md").read_text()
    assert "## Gold standard vs gold standard" in report and "difference (downweight)" in report
    assert "**gold vs gold**" in report
    assert golds["incomplete"][0] in report and "not compared" in report  # named, not silently dropped
    evaluated = json.loads((out / "evaluated.json").read_text())
    assert set(evaluated["gold_siblings"]) == {golds["difference (drop)"][0], golds["difference (downweight)"][0]}
    # symmetric: the drop gold standard's evaluation finds the derivative one
    back = pd.read_csv(evaluate(compose_config("evaluate", o)) / "gold_agreement.csv")
    assert set(back.sibling) == {"derivative (mask)", "difference (downweight)"}
    # W&B: the table and the per-checkpoint history, as in the CSV
    (logged,) = offline_runs(isolated_env / "runs")  # the derivative gold standard's evaluation
    ev = read_offline_run(logged)
    assert ev["run"]["job_type"] == "evaluate"
    table = ev["tables"]["tables/gold_agreement"]
    assert table["columns"] == list(agr.columns) and len(table["data"]) == len(agr)
    assert "tables/topk" not in ev["tables"] or ev["tables"]["tables/topk"]["data"] == []
    rows = {r["epoch"]: r for r in ev["history"] if "epoch" in r}
    r = agr[(agr.metric == "cosine") & ~agr.centered & (agr.sibling == "difference (drop)")].iloc[-1]
    assert math.isclose(rows[r.x]["gold_agreement/cosine_uncentered/difference (drop)"], r["mean"], rel_tol=1e-12)


def test_the_run_directory_of_the_default_selection_is_unchanged(tiny):
    """The new settings do not enter the run key either (train does not read them)."""
    a = RunDir.from_config(compose_config("train", tiny)).path.name
    b = RunDir.from_config(compose_config("train", tiny + DERIVATIVE)).path.name
    assert a == b
