"""W&B runs of every stage (tda.tracking, and what tda.evaluation.wandb_logging logs), read back
offline through W&B's own reader of the run's transaction log: evaluate logs exactly what it writes
to disk; a multirun is one W&B run per job; a failed stage's run is recorded as failed, a cached job
logs no timings; groups and tags name the experiment and the stage."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from helpers.config import ROOT, compose_config
from helpers.runs import trained
from helpers.wandb import offline_runs, read_offline_run, wandb_on

from tda.config import to_container
from tda.further_training.store import further_training_key, load_gold_standard
from tda.stages import attribute, evaluate, train
from tda.tracking import init_wandb, wandb_group, wandb_tags


def runs_by_job_type(root: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for d in offline_runs(root):
        r = read_offline_run(d)
        out.setdefault(r["run"]["job_type"], []).append(r)
    return out


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return a == pytest.approx(b, rel=1e-12, abs=1e-15)
    return a == b


def test_evaluate_logs_exactly_what_it_writes(tiny, isolated_env):
    tiny = wandb_on(tiny)
    run = train(compose_config("train", tiny))
    for method in ("further_training", "grad_dot", "grad_cos"):
        attribute(compose_config("attribute", tiny + [f"method={method}"]))
    cfg = compose_config("evaluate", tiny)
    out = evaluate(cfg)
    runs = runs_by_job_type(isolated_env / "runs")
    assert sorted(runs) == ["attribute", "evaluate", "train"]
    assert len(runs["train"]) == 1 and len(runs["attribute"]) == 3 and len(runs["evaluate"]) == 1
    ev = runs["evaluate"][0]

    # names, group, tags, resolved config
    assert ev["run"]["run_group"] == "breast_cancer-mlp" and ev["run"]["job_type"] == "evaluate"
    assert all(r["state"] == "finished" for rs in runs.values() for r in rs)  # exit code 0: succeeded
    assert {"stage:evaluate", "dataset:breast_cancer", "model:mlp", "further_optimizer:sgd"} <= set(ev["run"]["tags"])
    config = {k: v for k, v in ev["config"].items() if not k.startswith("_wandb")}  # W&B's chart specs
    assert config == to_container(cfg) and "${" not in repr(config)

    # curves: one history row per checkpoint, against the further-training epoch
    curves = pd.read_csv(out / "similarity.csv")
    rows = {r["epoch"]: r for r in ev["history"] if "epoch" in r}
    assert sorted(rows) == sorted(curves.x.unique())
    for _, r in curves.iterrows():
        key = f"{r.metric}_{'centered' if r.centered else 'uncentered'}/{r.method}"
        assert same(rows[r.x][key], r["mean"]) and same(rows[r.x][key + "/se"], r.se)
    step = {m["name"]: m.get("step_metric") for m in ev["metrics"] if "name" in m}
    assert step["cosine_centered/grad_dot"] == "epoch" and step["spearman_uncentered/grad_cos"] == "epoch"
    rel = pd.read_csv(out / "reliability.csv")
    for _, r in rel.iterrows():
        key = f"{r.metric}_{'centered' if r.centered else 'uncentered'}/gold_split_half"
        assert same(rows[r.x][key], r["mean"])

    # peak vs seeds: history against seeds_averaged
    peaks = pd.read_csv(out / "seed_windows.csv")
    prow = {r["seeds_averaged"]: r for r in ev["history"] if "seeds_averaged" in r}
    assert sorted(prow) == sorted(peaks.n_seeds_averaged.unique())
    for _, r in peaks.iterrows():
        key = f"peak_vs_seeds/{r.definition}/{r.metric}_{'centered' if r.centered else 'uncentered'}/{r.method}"
        assert same(prow[r.n_seeds_averaged][key], r.peak_mean)

    # tables equal the CSVs row for row
    for name in ("summary", "similarity", "seed_windows", "agreement", "reliability"):
        table = ev["tables"][f"tables/{name}"]
        csv = pd.read_csv(out / f"{name}.csv")
        assert table["columns"] == list(csv.columns), name
        assert len(table["data"]) == len(csv), name
        for logged, (_, row) in zip(table["data"], csv.iterrows()):
            for col, v in zip(table["columns"], logged):
                assert same(v, row[col].item() if hasattr(row[col], "item") else row[col]), (name, col, v, row[col])

    # one line_series chart per metric and centring, its data equal to the curves
    chart = ev["tables"]["charts/cosine_centered_table"]
    assert chart["columns"] == ["step", "lineKey", "lineVal"] and len(chart["data"]) == 2 * curves.x.nunique()
    for x, line, y in chart["data"]:
        want = curves[(curves.metric == "cosine") & curves.centered & (curves.method == line)
                      & (curves.x == x)]["mean"].item()
        assert same(y, want)

    # summary scalars for the run table
    summary = pd.read_csv(out / "summary.csv")
    for _, r in summary.iterrows():
        base = f"summary/{'centered' if r.centered else 'uncentered'}/{r.method}"
        for col in ("peak_cosine", "peak_x", "cosine_first", "cosine_last", "spearman_first", "spearman_last",
                    "seconds"):
            assert same(ev["summary"][f"{base}/{col}"], float(r[col])), (base, col)

    # figures as images, copied into the run
    images = [k[: -len(".path")] for k, v in ev["summary"].items() if k.endswith(".path") and str(v).endswith(".png")]
    assert {"figures/similarity", "figures/seed_windows", "figures/sorted_scores", "figures/agreement"} <= set(images)

    # train: Lightning curves and final metrics; attribute: wall time, memory, further-training progress
    tr = runs["train"][0]
    assert any("train/loss" in r for r in tr["history"]) and "final/test_accuracy" in tr["summary"]
    by_name = {r["run"]["display_name"].rsplit("/", 1)[-1]: r for r in runs["attribute"]}
    assert {"grad_dot", "grad_cos", "further_training"} == set(by_name)
    assert by_name["grad_dot"]["summary"]["seconds"] > 0 and "peak_mb" in by_name["grad_dot"]["summary"]
    assert "method:grad_dot" in by_name["grad_dot"]["run"]["tags"]
    ft = by_name["further_training"]
    gold = load_gold_standard(run.gold_dir(further_training_key(cfg)))
    progress = [r for r in ft["history"] if "gold/attribution_norm_centered" in r]
    assert [r["epoch"] for r in progress] == gold.checkpoint_axis()[1]
    norms = gold.attribution(center=True).norm(dim=-1).mean(-1)
    assert all(same(r["gold/attribution_norm_centered"], float(n)) for r, n in zip(progress, norms))
    assert ft["summary"]["seeds_done"] == len(gold.seeds)


def test_multirun_is_one_wandb_run_per_job(tiny, isolated_env):
    tiny = wandb_on(tiny)
    train(compose_config("train", [o for o in tiny if not o.startswith("logger=")] + ["logger=none"]))
    env = dict(os.environ)  # isolated_env: runs dir, W&B and HF caches under tmp, W&B offline
    proc = subprocess.run([sys.executable, "attribute.py", "-m", "method=grad_dot,grad_cos", *tiny],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = runs_by_job_type(isolated_env / "runs")
    assert list(runs) == ["attribute"] and len(runs["attribute"]) == 2
    methods = sorted(r["config"]["method"]["name"] for r in runs["attribute"])
    assert methods == ["grad_cos", "grad_dot"]
    assert {r["run"]["run_group"] for r in runs["attribute"]} == {"breast_cancer-mlp"}
    assert len({r["run"]["run_id"] for r in runs["attribute"]}) == 2
    for r in runs["attribute"]:
        assert f"method:{r['config']['method']['name']}" in r["run"]["tags"]
        assert r["summary"]["seconds"] > 0


def test_failed_stage_marks_its_wandb_run_failed_and_keeps_the_error(tiny, isolated_env):
    tiny = wandb_on(tiny)
    trained(tiny)
    with pytest.raises(FloatingPointError, match="further training diverged"):
        attribute(compose_config("attribute", tiny + ["method=further_training", "further_optimizer.lr=1e6"]))
    runs = {r["run"]["job_type"]: r for r in map(read_offline_run, offline_runs(isolated_env / "runs"))}
    assert runs["train"]["state"] == "finished" and runs["train"]["exit_code"] == 0
    assert runs["attribute"]["state"] == "failed" and runs["attribute"]["exit_code"] == 2  # a user error


def test_cached_jobs_log_no_timings_and_are_tagged_cached(tiny, isolated_env):
    tiny = wandb_on(tiny)
    for _ in range(2):
        trained(tiny)
        for method in ("further_training", "grad_dot"):
            attribute(compose_config("attribute", tiny + [f"method={method}"]))
    runs = sorted((read_offline_run(d) for d in offline_runs(isolated_env / "runs")),
                  key=lambda r: r["run"]["start_time"])
    assert [r["run"]["display_name"].rsplit("/", 1)[-1] for r in runs][3:] == \
        [r["run"]["display_name"].rsplit("/", 1)[-1] for r in runs][:3]
    first, again = runs[:3], runs[3:]
    for r in first:
        assert "cached" not in r["run"]["tags"] and "cached" not in r["summary"]
    for r in first[1:]:
        assert r["summary"]["seconds"] > 0 and "peak_mb" in r["summary"]
    for r in again:
        assert "cached" in r["run"]["tags"] and r["summary"]["cached"] is True and r["state"] == "finished"
        assert "seconds" not in r["summary"] and "peak_mb" not in r["summary"]
    assert again[1]["summary"]["seeds_done"] == 2 and again[1]["summary"]["seeds_computed"] == 0
    assert first[1]["summary"]["seeds_computed"] == 2
    assert {r["run"]["run_group"] for r in runs} == {"breast_cancer-mlp"}


def test_wandb_group_names_the_experiment():
    assert wandb_group(compose_config("train")) == "breast_cancer-mlp"
    assert wandb_group(compose_config("train", ["dataset=digits", "model=small_cnn"])) == "digits-small_cnn"
    assert wandb_group(compose_config("train", ["experiment=folktables_sgd_cpu"])) == "folktables_sgd_cpu"
    assert wandb_group(compose_config("train", ["name=sweep1"])) == "sweep1"
    assert wandb_group(compose_config("train", ["logger.group=g"])) == "g"


def test_wandb_tags_of_the_gold_stage_name_no_method(tiny):
    tags = wandb_tags(compose_config("further_train", tiny), "further_train")
    assert "stage:further_train" in tags and "further_optimizer:sgd" in tags
    assert not [t for t in tags if t.startswith("method:")]


def test_online_without_account_fails_fast_with_a_clear_message(tiny, monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    cfg = compose_config("evaluate", wandb_on(tiny) + ["logger.mode=online"])
    with pytest.raises(RuntimeError, match="wandb login"):
        init_wandb(cfg, "evaluate", "x")


def test_logger_none_logs_nothing(tiny, isolated_env):
    assert init_wandb(compose_config("evaluate", tiny), "evaluate", "x") is None
    assert offline_runs(isolated_env / "runs") == []
