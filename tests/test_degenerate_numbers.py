"""Numbers that are well-formed but meaningless (issue 24): similarity of scores of any finite
magnitude; no top-k figure, peak checkpoint or rank taken from tie order when a gold standard or
a method has no variation over the left-out instances; and every output (report.md, the CSVs,
the figures' legends, the console, W&B; LDS / LOO correlation, comparisons and mislabel
detection too) saying which numbers are undefined, for how many test instances and why."""

from __future__ import annotations

import logging
import math
import re

import numpy as np
import pandas as pd
import pytest
import torch
from helpers.config import compose_config
from helpers.evaluation import COMPARE, synthetic_gold
from helpers.wandb import offline_runs, read_offline_run, wandb_on
from scipy.stats import spearmanr

from tda.evaluation import plots
from tda.evaluation.curves import gold_attribution, similarity_curves
from tda.evaluation.evaluate_mislabel import mislabel_report
from tda.evaluation.lds import lds, lds_undefined, loo_correlation, loo_undefined
from tda.evaluation.metrics import mean_and_se, rowwise_cosine, rowwise_spearman
from tda.evaluation.mislabel import constant_sources, mislabel_table, self_influence_agreement
from tda.evaluation.top_k import top_instances, top_k_hits, top_k_overlap
from tda.evaluation.undefined import (
    GOLD_CONSTANT,
    METHOD_CONSTANT,
    METHOD_ZERO,
    ZERO_VECTOR,
    sentences,
    similarity_undefined,
)
from tda.further_training.store import further_training_key, load_gold_standard
from tda.further_training.subset_store import load_subset_gold_standard
from tda.runs import RunDir
from tda.scores import save_method_scores
from tda.stages import attribute, evaluate, train


def _pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(6, 40, dtype=torch.float64, generator=g)
    return a, a + 0.5 * torch.randn(6, 40, dtype=torch.float64, generator=g)


def _numpy_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Independent: each row divided by its own norm, computed in long double."""
    a, b = a.astype(np.longdouble), b.astype(np.longdouble)
    return (a * b).sum(-1) / np.sqrt((a * a).sum(-1) * (b * b).sum(-1))


@pytest.mark.parametrize("scale", [1e200, 1e-170, 1e300, 1e-300])
def test_cosine_and_spearman_of_any_finite_magnitude(scale):
    a, b = _pair()
    expected = _numpy_cosine(a.numpy(), b.numpy()).astype(np.float64)
    for x, y in ((a * scale, b), (a, b * scale), (a * scale, b * scale)):
        assert torch.isfinite(x).all() and torch.isfinite(y).all()
        np.testing.assert_allclose(rowwise_cosine(x, y).numpy(), expected, rtol=1e-12)
        rho = np.array([spearmanr(u, v).statistic for u, v in zip(x.numpy(), y.numpy())])
        np.testing.assert_allclose(rowwise_spearman(x, y).numpy(), rho, rtol=1e-12)


def test_cosine_of_ordinary_magnitudes_is_bit_for_bit_the_plain_formula():
    """The rescaling by a power of two is exact: results of earlier evaluations do not move."""
    for seed in range(5):
        a, b = _pair(seed)
        a, b = a * 10.0 ** (seed - 2), b * 3.0
        plain = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
        assert torch.equal(rowwise_cosine(a, b), plain)


def test_a_zero_row_is_undefined_not_a_number_from_nothing():
    a, b = _pair()
    a[2] = 0.0
    cos = rowwise_cosine(a, b)
    assert math.isnan(cos[2]) and torch.isfinite(cos[[0, 1, 3, 4, 5]]).all()
    mean, _, used, skipped = mean_and_se(cos)
    assert (used, skipped) == (5, 1) and math.isfinite(mean)


def test_top_k_of_a_constant_gold_standard_or_method_is_undefined():
    """A gold standard that is exactly zero (e.g. further_optimizer.lr=1e-20) or a method
    whose scores are constant has no top k: precision and recall are NaN for those test
    instances (counted as skipped), never 0/1 from the order of ties."""
    gold, method = _pair()
    gold[1] = 0.0
    method[4] = 7.0
    precision, recall = top_k_hits(gold, method, k=5, m=10, descending=True)
    for v in (precision, recall):
        assert torch.isnan(v[[1, 4]]).all() and not torch.isnan(v[[0, 2, 3, 5]]).any()
        assert mean_and_se(v)[2:] == (4, 2)
    # the others are what the plain definition gives
    for i in (0, 2, 3, 5):
        top_gold = set(gold[i].argsort(descending=True)[:5].tolist())
        top_method = set(method[i].argsort(descending=True)[:5].tolist())
        assert precision[i] == len(top_gold & top_method) / 5


def test_top_k_overlap_skips_constant_rows_and_is_nan_when_none_is_left():
    gold, method = _pair()
    helpful, harmful = top_k_overlap(gold, method, 5)
    assert 0 <= helpful <= 1 and 0 <= harmful <= 1
    assert all(math.isnan(v) for v in top_k_overlap(torch.zeros_like(gold), method, 5))
    kept = top_k_overlap(gold[1:], method[1:], 5)
    gold[0] = 0.0
    assert top_k_overlap(gold, method, 5) == kept


def test_self_influence_with_nan_is_refused_naming_the_training_positions():
    from tda.exits import RefusedError
    from tda.scores import require_finite_scores

    values = torch.arange(30, dtype=torch.float64)
    values[[4, 17]] = float("nan")
    with pytest.raises(RefusedError, match=r"scores of trak hold 2 NaN/inf entries of 30 \(training positions "
                                           r"\[4, 17\]\); the method failed numerically"):
        require_finite_scores("trak", values)
    require_finite_scores("trak", torch.zeros(30))  # constant is finite: reported as undefined, not refused


# ---------------------------------------------------------------------------------- said in every output
def _write_method(run: RunDir, name: str, scores: torch.Tensor, gold) -> None:
    """Scores in the layout the attribute stage writes (checksummed scores + record)."""
    d = run.path / "methods" / f"{name}-test"
    header = {"method": name, "config": {}, "final_model": gold.meta["final_model"], "shape": list(scores.shape)}
    save_method_scores(d, scores, header, {"seconds": 0.0, "peak_mb": 0.0, "key": d.name,
                                           "left_out_indices": gold.meta["left_out_indices"],
                                           "test_indices": gold.meta["test_indices"]})


def test_undefined_numbers_are_said_with_their_reason_in_every_output(pipeline, tiny, isolated_env, monkeypatch,
                                                                      caplog):
    """A method whose scores are zero for every test instance and one constant for two of them:
    report.md, examples.md, the CSVs, the figure's legend, the console and the W&B run say which
    numbers are undefined, for how many test instances and why; no peak, rank or top-k list is
    taken from the order of ties; the numbers that are defined do not move."""
    cfg = compose_config("evaluate", wandb_on(tiny + ["evaluate.examples.n_test=6", "evaluate.top_k=[2]"]))
    run = RunDir.from_config(cfg)
    only_curves = ["evaluate.examples.n_test=0", "evaluate.seed_windows=[1]"]  # they do not change similarity.csv
    before = pd.read_csv(evaluate(compose_config("evaluate", tiny + only_curves)) / "similarity.csv")
    gold = load_gold_standard(run.gold_dir(further_training_key(cfg)))
    last = gold.attribution(center=False)[-1]
    n_test = last.shape[0]
    partly = last.clone()
    partly[[1, 3]] = 5.0
    _write_method(run, "zero", torch.zeros_like(last), gold)
    _write_method(run, "partly_constant", partly, gold)
    legends = []
    save = plots._save

    def legend_texts(fig, path, title=""):  # what the figure says, read before it becomes pixels
        legends.append((path.name, [t.get_text() for legend in fig.legends for t in legend.get_texts()]))
        return save(fig, path, title)
    monkeypatch.setattr(plots, "_save", legend_texts)
    with caplog.at_level(logging.WARNING, logger="tda.evaluation"):
        out = evaluate(cfg)

    zero_cosine = (f"zero: cosine undefined for {n_test} of {n_test} test instances at every checkpoint: "
                   f"{ZERO_VECTOR}: {METHOD_ZERO}")
    partly_spearman = (f"partly_constant: spearman undefined for 2 of {n_test} test instances at every "
                       f"checkpoint: {METHOD_CONSTANT}")
    zero_top_k = (f"zero: precision, recall, overlap undefined for {n_test} of {n_test} test instances at every "
                  f"checkpoint: {METHOD_CONSTANT}")
    zero_classes = f"zero: cosine with same class undefined for {n_test} of {n_test} test instances: {METHOD_CONSTANT}"
    report = (out / "report.md").read_text()
    for said in (zero_cosine, partly_spearman, zero_top_k, zero_classes):
        assert said in report and said in caplog.text, said
    assert not re.search(r"\|\s*(nan|<NA>)\s*\|", report, flags=re.IGNORECASE)  # no cell prints NaN
    zero_row = next(line for line in report.splitlines() if line.startswith("| zero | centred |"))
    # peak, its checkpoint and x, first and last cosine and Spearman, the two overlaps
    assert [c.strip() for c in zero_row.split("|")].count("undefined") == 9

    summary = pd.read_csv(out / "summary.csv")
    zero = summary[summary.method == "zero"]
    top_k = [c for c in summary.columns if c.startswith(("precision_at_", "recall_"))]
    assert top_k
    for col in ("peak_cosine", "peak_checkpoint", "peak_x", "cosine_last", "spearman_last", "top_k_helpful_overlap",
                *top_k):
        assert zero[col].isna().all(), col  # NaN in the CSV, not a number from the order of ties
    assert (summary[summary.method == "partly_constant"].spearman_skipped == 2 * gold.n_checkpoints).all()
    undefined = pd.read_csv(out / "undefined.csv")
    curves = pd.read_csv(out / "similarity.csv")
    for _, r in curves[curves.n_skipped > 0].iterrows():  # every skip is explained, with its count
        why = undefined[(undefined.analysis == "similarity") & (undefined.method == r.method)
                        & (undefined.metric == r.metric) & (undefined.centered == r.centered)]
        assert why.n_undefined.sum() == r.n_skipped, (r.method, r.metric)
    # the defined numbers are those of the evaluation without the degenerate methods, bit for bit
    pd.testing.assert_frame_equal(curves[curves.method == "grad_dot"].reset_index(drop=True), before)

    examples = (out / "examples.md").read_text()
    assert f"undefined for {n_test} of {n_test} test instances: {METHOD_CONSTANT}" in examples
    assert "zero undefined / undefined" in examples and "## Test instance" in examples
    table = pd.read_csv(out / "examples.csv")
    assert table["zero:rank"].isna().all() and table["zero:agrees"].isna().all()
    assert table["grad_dot:rank"].notna().all()

    (_, similarity_legend), = [(n, t) for n, t in legends if n == "similarity.png"]
    legend = [" ".join(t.split()) for t in similarity_legend]  # long entries are wrapped
    assert f"zero — cosine undefined: {ZERO_VECTOR}: {METHOD_ZERO}; spearman undefined: {METHOD_CONSTANT}" in legend
    assert (f"partly_constant — spearman partly undefined (2 of {n_test} test instances: {METHOD_CONSTANT})"
            in legend)

    (_, class_legend), = [(n, t) for n, t in legends if n == "class_structure.png"]
    assert f"zero — cosine with same class undefined: {METHOD_CONSTANT}" in [" ".join(t.split()) for t in class_legend]

    (ev,) = [r for r in map(read_offline_run, offline_runs(isolated_env / "runs"))
             if r["run"]["job_type"] == "evaluate"]
    said = ev["summary"]["undefined/similarity/zero/cosine_centered"]
    assert said == zero_cosine.replace("cosine", "cosine (centred)", 1)
    assert "summary/centered/zero/peak_cosine" not in ev["summary"]  # no NaN shown as a number
    assert ev["summary"]["summary/centered/grad_dot/peak_cosine"] == pytest.approx(
        summary[(summary.method == "grad_dot") & summary.centered].peak_cosine.item(), rel=1e-12)
    assert "tables/undefined" in ev["tables"]


def test_lds_and_loo_correlation_say_which_test_instances_are_undefined_and_why():
    """A method constant for some test instances (over the training set) and a subset gold
    standard whose output is the same for every subset for one test instance: lds_undefined /
    loo_undefined count exactly the test instances lds / loo_correlation skip, with the reason."""
    g = torch.Generator().manual_seed(0)
    n_test, n_train, m = 5, 12, 9
    scores = torch.randn(n_test, n_train, dtype=torch.float64, generator=g)
    scores[1] = 0.0
    masks = torch.rand(m, n_train, generator=g) < 0.5
    outputs = torch.randn(2, n_test, m, dtype=torch.float64, generator=g)
    outputs[1, 3] = 0.25  # the same output for every subset, at the second checkpoint only
    curves = lds({"m": scores}, masks, {"margin": outputs}, "epoch", [1.0, 2.0])
    why = lds_undefined({"m": scores}, masks, {"margin": outputs}, "epoch", [1.0, 2.0])
    for t, skipped in enumerate(curves.sort_values("checkpoint").n_skipped):
        at = why[why["where"].isin(["every checkpoint", f"epoch {t + 1:g}"])]
        assert at.n_undefined.sum() == skipped
    assert set(why.reason) == {"the method's predictions (the sums of its scores over each subset) are the same for "
                               "every subset for this test instance",
                               "the subset gold standard's margin is the same for every subset for this test instance"}
    left_out = [0, 2, 4, 6, 8, 10]
    gold = torch.randn(2, n_test, len(left_out), dtype=torch.float64, generator=g)
    gold[:, 4] = 0.0
    loo = loo_correlation({"m": scores}, gold, left_out, "further training", "epoch", [1.0, 2.0])
    why = loo_undefined({"m": scores}, gold, left_out, "further training", "epoch", [1.0, 2.0])
    assert (loo.n_skipped == 2).all() and list(why.n_undefined) == [1, 1]
    assert set(why.reason) == {METHOD_CONSTANT, GOLD_CONSTANT} and set(why["where"]) == {"every checkpoint"}


def test_a_comparison_says_what_is_undefined_and_why(pipeline, tiny):
    """evaluate.compare: the zero method's cells read `undefined`, the report and undefined.csv
    say for how many test instances and why, the figure's legend says it too."""
    cfg = compose_config("evaluate", tiny)
    run = RunDir.from_config(cfg)
    gold = load_gold_standard(run.gold_dir(further_training_key(cfg)))
    _write_method(run, "zero", torch.zeros_like(gold.attribution(center=False)[-1]), gold)
    overrides = tiny + COMPARE + ["evaluate.seed_windows=[1]"]
    out = evaluate(compose_config("evaluate", overrides), overrides)
    n_test = len(gold.meta["test_indices"])
    report = (out / "report.md").read_text()
    assert (f"seed=0 / zero: spearman undefined for {n_test} of {n_test} test instances at every checkpoint: "
            f"{METHOD_CONSTANT}") in report
    assert not re.search(r"\|\s*(nan|<NA>)\s*\|", report, flags=re.IGNORECASE)
    summary = pd.read_csv(out / "summary.csv")
    assert summary[summary.method == "zero"][["peak_cosine", "peak_checkpoint", "spearman_last"]].isna().all().all()
    assert set(pd.read_csv(out / "undefined.csv").method) == {"seed=0 / zero"}


def test_a_constant_self_influence_is_said_to_rank_nothing():
    """Mislabel detection: a source whose self-influence is the same for every training
    instance has the AUC and found-at fractions of a random order (the expectation over the
    orders of ties) and no Spearman with the others; report.md says so in words."""
    g = torch.Generator().manual_seed(0)
    flipped = torch.zeros(40, dtype=torch.bool)
    flipped[:8] = True
    self_influence = {"grad_dot": torch.randn(40, generator=g) + 2 * flipped, "flat": torch.zeros(40)}
    tables = {"mislabel": mislabel_table(self_influence, flipped, {}),
              "self_influence_agreement": self_influence_agreement(self_influence)}
    flat = tables["mislabel"].set_index("method").loc["flat"]
    assert flat.auc == 0.5 and flat.found_at_10 == pytest.approx(0.1)
    constant = constant_sources(self_influence)
    assert list(constant) == ["flat"]
    report = mislabel_report("t", tables, {}, constant)
    assert "| grad_dot | flat | undefined |" in report
    assert "flat: the self-influence is constant over the training set: it ranks nothing" in report


SMALL = ["dataset.max_train=40", "dataset.max_test=20", "train.epochs=2", "train.batch_size=16",
         "selection.n_left_out=null", "selection.n_test=4", "trainer.progress_bar=false", "logger=none",
         "further_training.subsets.count=8", "gold_standard=retraining_subsets"]


def test_the_lds_evaluation_says_what_is_undefined_and_why(monkeypatch):
    """Against a subset gold standard: a method whose scores are zero has an undefined LDS and
    LOO correlation for every test instance, said in report.md, undefined.csv and the figures'
    legends; its summary has no peak (not the last checkpoint's x by default)."""
    run = train(compose_config("train", SMALL))
    attribute(compose_config("attribute", [*SMALL, "method=grad_dot"]))
    attribute(compose_config("attribute", [*SMALL, "method=further_training"]))
    loo = [o for o in SMALL if not o.startswith("gold_standard=")] + ["further_training.n_seeds=2",
                                                                       "further_training.epochs=1"]
    attribute(compose_config("attribute", [*loo, "method=further_training"]))  # a leave-one-out gold standard
    gold = load_subset_gold_standard(run.gold_dir(further_training_key(compose_config("attribute", SMALL))))
    _write_method(run, "zero", torch.zeros(4, 40, dtype=torch.float64), gold)
    legends = []
    save = plots._save

    def legend_texts(fig, path, title=""):
        legends.append((path.name, [" ".join(t.get_text().split()) for lg in fig.legends for t in lg.get_texts()]))
        return save(fig, path, title)
    monkeypatch.setattr(plots, "_save", legend_texts)
    out = evaluate(compose_config("evaluate", SMALL))
    constant = ("the method's predictions (the sums of its scores over each subset) are the same for every subset "
                "for this test instance")
    said = f"zero: lds_margin undefined for 4 of 4 test instances at every checkpoint: {constant}"
    assert said in (out / "report.md").read_text()
    assert set(pd.read_csv(out / "undefined.csv").method) == {"zero"}
    summary = pd.read_csv(out / "summary.csv").set_index("method")
    assert summary.loc["zero", ["lds_margin_peak", "lds_margin_peak_x", "lds_margin_last"]].isna().all()
    assert summary.loc["grad_dot", ["lds_margin_peak", "lds_margin_peak_x"]].notna().all()
    (_, legend), = [(n, t) for n, t in legends if n == "lds.png"]
    assert f"zero — lds_margin undefined: {constant}; lds_loss undefined: {constant}" in legend
    (_, legend), = [(n, t) for n, t in legends if n == "loo_correlation.png"]
    assert any(t.startswith("zero — loo_correlation vs ") and t.endswith(f"undefined: {METHOD_CONSTANT}")
               for t in legend), legend
    assert summary.loc["zero"].filter(like="loo_correlation_last[").isna().all()


def test_no_most_helpful_list_or_rank_from_the_order_of_ties():
    """examples' table: a test instance whose gold standard is constant lists no most helpful /
    harmful instances; a method constant for a test instance has no rank and no agreement there
    (empty in the CSV), while every other rank is the plain one."""
    gold, method = _pair()
    gold[2] = 0.0
    method[4] = 3.0
    table = top_instances(gold, {"m": method}, [1, 2, 4], list(range(100, 140)), list(range(6)), k=3)
    assert set(table.test_position) == {1, 4}
    at4 = table[table.test_position == 4]
    assert at4["m:rank"].isna().all() and at4["m:agrees"].isna().all()
    at1 = table[table.test_position == 1]
    order = method[1].argsort(descending=True).tolist()
    assert [order.index(j) + 1 for j in at1.left_out_position] == at1["m:rank"].tolist()
    assert str(at1["m:rank"].dtype) == "Int64" and str(at1["m:agrees"].dtype) == "boolean"


def test_a_gold_standard_zero_for_some_test_instances_is_said_where():
    """A gold standard exactly zero for one test instance at every checkpoint and for another at
    the first only: the reasons name the gold standard, count what similarity_curves skips at
    each checkpoint and say where ("every checkpoint" or the epochs)."""
    gold = synthetic_gold(T=3, n_test=5, n_lo=7)
    gold.diff[:, 1] = 0.0
    gold.diff[0, 3] = 0.0
    scores = {"m": torch.randn(5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))}
    curves = similarity_curves(gold, scores)
    why = similarity_undefined(gold, scores, ("cosine", "spearman"), (True, False))
    def applies(where: str, x: float) -> bool:
        return where == "every checkpoint" or x in [float(v) for v in where.removeprefix("epoch ").split(", ")]
    for _, r in curves.iterrows():
        at = why[(why.analysis == "similarity") & (why.metric == r.metric) & (why.centered == r.centered)
                 & why["where"].map(lambda w, x=r.x: applies(w, x))]
        assert at.n_undefined.sum() == r.n_skipped == (2 if r.checkpoint == 0 else 1)
    said = sentences(why[why.analysis == "similarity"])
    assert f"m: spearman undefined for 2 of 5 test instances at epoch 1: {GOLD_CONSTANT}" in said
    assert f"m: spearman undefined for 1 of 5 test instances at epoch 2, 3: {GOLD_CONSTANT}" in said
    assert f"m: cosine undefined for 1 of 5 test instances at epoch 2, 3: {ZERO_VECTOR}: {GOLD_CONSTANT}" in said


def test_a_constant_gold_row_centres_to_exactly_zero():
    """0.1 three times averages to 0.1 + 1.4e-17: centring by the mean alone would leave a
    residue whose (scale-free) cosine with any method is a number from rounding; the row is
    exactly 0, so its cosine is undefined. Rows that vary are centred as before."""
    from tda.further_training.attribution import postprocess

    diff = torch.full((1, 2, 3, 1), 0.1, dtype=torch.float64)
    diff[0, 1, :, 0] = torch.tensor([0.1, 0.2, 0.4], dtype=torch.float64)
    assert (diff - diff.mean(2, keepdim=True))[0, 0].abs().max() > 0  # the rounding this guards against
    a = postprocess(diff, torch.zeros(1, 2, 1, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    assert torch.equal(a[0, 0], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(a[0, 1], (diff - diff.mean(2, keepdim=True))[0, 1, :, 0])
    assert math.isnan(rowwise_cosine(a[0], torch.ones(2, 3, dtype=torch.float64))[0])


def test_the_gold_standards_own_comparisons_say_why_they_are_undefined():
    """Split-half reliability, gold vs gold and further training vs retraining count exactly the
    test instances their tables skip, and say which gold standard is constant there."""
    from tda.evaluation.curves import split_half_reliability
    from tda.evaluation.diagnostics import further_training_vs_retraining, gold_agreement
    from tda.evaluation.undefined import gold_comparisons_undefined

    gold = synthetic_gold(T=3, n_test=5, n_lo=7, S=4)
    gold.diff[:, 2, :, :2] = 0.0  # test instance 2: zero in the first half of the seeds only
    other = synthetic_gold(T=3, n_test=5, n_lo=7, S=4, seed=1)
    other.diff[:, 4] = 0.0  # test instance 4: zero in the sibling at every checkpoint
    why = gold_comparisons_undefined(gold, ("cosine", "spearman"), (True, False), {"mask": other}, {"ft": other})
    reliability = split_half_reliability(gold_attribution(gold), 4, *gold.checkpoint_axis())
    siblings = gold_agreement(gold, "drop", {"mask": ("k", other)})
    versus = further_training_vs_retraining(gold, {"ft": other})
    for analysis, table in (("split-half reliability", reliability), ("gold vs gold", siblings),
                            ("further training vs retraining", versus)):
        for _, r in table[table.metric.isin(["cosine", "spearman"])].iterrows():
            at = why[(why.analysis == analysis) & (why.metric == r.metric) & (why.centered == r.centered)]
            assert at.n_undefined.sum() == r.n_skipped == 1, (analysis, r.metric, r.centered)
    said = sentences(why)
    assert ("2 vs 2 seeds: spearman undefined for 1 of 5 test instances at every checkpoint: the gold standard of "
            "the first half of the seeds is constant for this test instance") in said
    assert ("gold standard vs mask: cosine undefined for 1 of 5 test instances at every checkpoint: "
            f"{ZERO_VECTOR}: the gold standard mask is constant (zero) for this test instance") in said
    assert any(s.startswith("ft vs retraining: spearman undefined for 1 of 5 test instances at every checkpoint: "
                            "the further-training gold standard ft is constant") for s in said)
    assert not len(gold_comparisons_undefined(synthetic_gold(S=4), ("cosine", "spearman"), (True, False)))
