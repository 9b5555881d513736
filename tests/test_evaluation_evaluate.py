"""The evaluate stage on disk (tda.evaluation.evaluate, loading, examples): known answers through
every output file, readable labels for several configs of one method, image examples, NaN/inf scores
refused naming the method, and the gold-standard key computed once per evaluation."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
import torch
from helpers.config import compose_config
from helpers.evaluation import synthetic_gold

from tda.artifacts import load_json
from tda.config import config_hash
from tda.evaluation.loading import load_all_method_scores
from tda.exits import RefusedError
from tda.further_training import store
from tda.further_training.attribution import GoldStandard
from tda.further_training.store import further_training_key, load_gold_standard
from tda.runs import RunDir
from tda.scores import save_method_scores
from tda.stages import attribute, evaluate, train


def _write_method(run: RunDir, name: str, scores: torch.Tensor, gold: GoldStandard, config: dict) -> None:
    """A method result in the layout the attribute stage writes (scores + record)."""
    d = run.path / "methods" / f"{name}-test"
    header = {"method": name, "config": config, "final_model": gold.meta["final_model"], "shape": list(scores.shape)}
    save_method_scores(d, scores, header, {"seconds": 0.0, "peak_mb": 0.0, "key": d.name,
                                           "left_out_indices": gold.meta["left_out_indices"],
                                           "test_indices": gold.meta["test_indices"]})


def test_evaluate_stage_known_answers_on_disk(tiny):
    run = train(compose_config("train", tiny))
    for method in ("further_training", "grad_dot"):
        attribute(compose_config("attribute", tiny + [f"method={method}"]))
    cfg = compose_config("evaluate", tiny)
    gold = load_gold_standard(run.gold_dir(further_training_key(cfg)))
    last = gold.attribution(center=False)[-1]
    _write_method(run, "oracle", last, gold, {})
    _write_method(run, "anti_oracle", -last, gold, {})
    out = evaluate(cfg)
    curves = pd.read_csv(out / "similarity.csv")
    sel = (curves.metric == "cosine") & (~curves.centered) & (curves.checkpoint == gold.n_checkpoints - 1)
    assert curves[sel & (curves.method == "oracle")]["mean"].item() == pytest.approx(1.0, abs=1e-12)
    assert curves[sel & (curves.method == "anti_oracle")]["mean"].item() == pytest.approx(-1.0, abs=1e-12)
    summary = pd.read_csv(out / "summary.csv")
    assert set(summary.method) == {"oracle", "anti_oracle", "grad_dot"}
    row = summary[(summary.method == "oracle") & (~summary.centered)].iloc[0]
    assert row.peak_cosine == pytest.approx(1.0) and row.peak_checkpoint == gold.n_checkpoints - 1
    assert row.cosine_last == pytest.approx(1.0) and row.top_k_helpful_overlap == pytest.approx(1.0)
    for f in ("similarity.png", "seed_windows.png", "sorted_scores.png", "agreement.png", "report.md", "examples.md",
              "reliability.csv", "seed_windows.csv", "sorted_scores.csv", "agreement.csv", "examples.csv"):
        assert (out / f).is_file(), f
    report = (out / "report.md").read_text()
    assert "![similarity](similarity.png)" in report and "[summary.csv](summary.csv)" in report
    examples = (out / "examples.md").read_text()
    assert "mean radius" in examples and "oracle:agrees" in examples  # tabular: feature names and values
    agr = pd.read_csv(out / "agreement.csv")
    oracles = ["oracle", "anti_oracle"]
    pair = agr[(agr.metric == "cosine") & (agr.method_a.isin(oracles)) & (agr.method_b.isin(oracles))]
    assert pair["mean"].item() == pytest.approx(-1.0)


def test_several_configs_of_one_method_get_readable_labels(tmp_path):
    run, gold = RunDir(tmp_path / "run"), synthetic_gold(n_test=6, n_lo=8)
    final_model = {"weights": "w", "data": "d", "selection": "s", "run": "r"}
    s = torch.randn(6, 8, dtype=torch.float64)
    for damping in (0.1, 10.0):
        header = {"method": "cg", "config": {"damping": damping, "iters": 5}, "final_model": final_model,
                  "shape": [6, 8]}
        save_method_scores(run.path / "methods" / f"cg-{damping}", s * damping, header, {"seconds": 1.0})
    scores, _ = load_all_method_scores(run, final_model, gold)
    assert sorted(scores) == ["cg(damping=0.1)", "cg(damping=10.0)"]


@pytest.mark.slow
def test_image_examples_are_rendered(tiny):
    img = [o for o in tiny if not o.startswith("dataset.")] + ["dataset=digits", "dataset.max_train=120",
                                                                "dataset.max_test=30", "selection.n_left_out=10"]
    train(compose_config("train", img))
    for method in ("further_training", "grad_dot"):
        attribute(compose_config("attribute", img + [f"method={method}", "further_training.epochs=1"]))
    out = evaluate(compose_config("evaluate", img + ["further_training.epochs=1", "evaluate.examples.n_test=1"]))
    sel = load_json(RunDir.from_config(compose_config("evaluate", img)).selection)
    png = out / f"examples_test{sel['test_indices'][0]}.png"
    assert png.is_file() and png.name in (out / "examples.md").read_text()


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
    with pytest.raises(RefusedError, match=r"scores of grad_dot hold 2 NaN/inf entries of 48 "
                                          r"\(test positions \[1, 3\]\)"):
        evaluate(compose_config("evaluate", tiny))
    # checked on every load: a re-run of the method does not take them as "already in"
    with pytest.raises(RefusedError, match=f"NaN/inf entries .* To fix: delete {re.escape(str(out))} and re-run"):
        attribute(compose_config("attribute", tiny + ["method=grad_dot"]))


def test_gold_key_computed_once_per_evaluation(tiny, monkeypatch):
    train(compose_config("train", tiny))
    for method in ("further_training", "grad_dot"):
        attribute(compose_config("attribute", tiny + [f"method={method}"]))
    calls = []

    def counted(*nodes, **kwargs):
        calls.append(1)
        return config_hash(*nodes, **kwargs)

    monkeypatch.setattr(store, "config_hash", counted)
    out = evaluate(compose_config("evaluate", tiny))
    assert len(calls) == 1 and out.name == further_training_key(compose_config("evaluate", tiny))
    assert load_gold_standard(out.parent.parent / "gold" / out.name).seeds == [0, 1]
