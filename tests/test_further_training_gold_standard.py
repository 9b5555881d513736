"""The job that writes the gold standard (tda.further_training.gold_standard): under Lightning it
equals the reference engine; it resumes after an interruption without redoing a seed; identical jobs
running at once split the seeds; runs that diverge or leave the sane range are named and never
written; batch-norm and checkpoint settings are checked; one progress bar over seeds and groups with
Lightning's per-group output silenced."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers.config import ROOT, compose_config
from helpers.further_training import F64, job_for, toy_problem
from torch import nn

from tda.artifacts import load_tensors
from tda.exits import RefusedError
from tda.further_training.gold_standard import FurtherTraining
from tda.further_training.store import further_training_key, load_gold_standard, seed_file
from tda.problem import AttributionProblem
from tda.runs import RunDir
from tda.stages import attribute, evaluate, train


@pytest.mark.slow
def test_gold_standard_under_lightning_equals_reference_engine(tmp_path):
    cfg, problem = toy_problem(["further_optimizer=adam", "further_optimizer.lr=0.01"])
    job_for(cfg).run(problem, tmp_path / "stacked")
    cfg2, problem2 = toy_problem(["further_optimizer=adam", "further_optimizer.lr=0.01",
                                  "further_training.engine=reference"])
    job_for(cfg2).run(problem2, tmp_path / "ref")
    a, b = load_gold_standard(tmp_path / "stacked"), load_gold_standard(tmp_path / "ref")
    assert a.diff.shape == (2, 5, 6, 3) and a.seeds == [0, 1, 2]
    assert float(a.diff.abs().max()) > 1e-6
    assert float((a.diff - b.diff).abs().max()) < 1e-12
    assert further_training_key(cfg) == further_training_key(cfg2)


def test_resume_after_interruption(tmp_path, monkeypatch):
    """A crash in the middle of seed 1 (inside a Lightning training step) leaves seed 0's
    file and nothing of seed 1; the re-run computes only seeds 1 and 2."""
    from tda.further_training.engine import GroupTrainer

    cfg, problem = toy_problem([])
    seeds_started, original_step = [], GroupTrainer.step

    def crashing_step(self, epoch, b):
        if epoch == 0 and b == 0:
            seeds_started.append(self.seed)
        if self.seed == 1 and seeds_started.count(1) == 1 and epoch == 1:
            raise RuntimeError("node lost")
        return original_step(self, epoch, b)

    monkeypatch.setattr(GroupTrainer, "step", crashing_step)
    with pytest.raises(RuntimeError, match="node lost"):
        job_for(cfg).run(problem, tmp_path)
    assert seed_file(tmp_path, 0).is_file() and not seed_file(tmp_path, 1).is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary file left behind
    with pytest.raises(FileNotFoundError, match="missing seed 1; seed 2"):
        load_gold_standard(tmp_path)
    assert load_gold_standard(tmp_path, require_all=False).seeds == [0]
    first = load_tensors(seed_file(tmp_path, 0))["diff"]
    job_for(cfg).run(problem, tmp_path)
    assert seeds_started == [0, 1, 1, 2]  # seed 0 was not recomputed
    assert torch.equal(load_tensors(seed_file(tmp_path, 0))["diff"], first)
    assert load_gold_standard(tmp_path).seeds == [0, 1, 2]


@pytest.mark.slow
def test_identical_concurrent_further_training_jobs_split_the_seeds(tiny, tmp_path):
    overrides = tiny + ["further_training.n_seeds=4", "further_training.epochs=6", "trainer.progress_bar=false"]
    train(compose_config("train", overrides))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    logs = [tmp_path / f"job{i}.log" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "attribute.py", *overrides, "method=further_training"], cwd=ROOT,
                              env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT) for log in logs]
    assert [p.wait(timeout=600) for p in procs] == [0, 0], [log.read_text()[-2000:] for log in logs]
    text = "".join(log.read_text() for log in logs)
    computed = [line for line in text.splitlines() if "further training seed" in line]
    assert len(computed) == 4, text[-3000:]  # every seed computed exactly once between the two jobs
    gold_dir = RunDir.from_config(compose_config("train", overrides)).gold_dir(
        further_training_key(compose_config("attribute", overrides)))
    together = load_gold_standard(gold_dir)
    shutil.rmtree(gold_dir)
    attribute(compose_config("attribute", overrides + ["method=further_training"]))
    assert torch.equal(load_gold_standard(gold_dir).diff, together.diff)


# ------------------------------------------------------------------ divergence and the sane range
def test_diverged_runs_are_named_and_never_written(tmp_path):
    """A training row that blows up every run containing it: all runs but the one leaving
    it out diverge; the error names them and the seed, and nothing is written."""
    cfg, problem = toy_problem(["further_optimizer.lr=10"])
    problem.x_train[10] = 1e200  # left-out instance 10 (left_out_indices = 0, 5, 10, ...)
    with pytest.raises(FloatingPointError, match=r"seed 0: the full-data run and the runs leaving out training "
                                                 r"instances \[0, 5, .*\]\. Nothing was written") as err:
        job_for(cfg).run(problem, tmp_path)
    named = str(err.value).split("[")[1].split("]")[0].split(", ")
    assert "10" not in named  # the run without the offending row stayed finite
    assert not seed_file(tmp_path, 0).is_file()


def test_diverging_further_training_is_reported_with_seed_and_instances(tiny, pipeline):
    cfg = compose_config("attribute", tiny + ["method=further_training", "further_optimizer.lr=1e12"])
    with pytest.raises(FloatingPointError,
                       match=r"diverged .* for seed 0: .*(full-data run|leaving out training instances \[)"):
        attribute(cfg)
    gold_dir = RunDir.from_config(cfg).gold_dir(further_training_key(cfg))
    assert not list(gold_dir.glob("seed_*.safetensors"))  # nothing written, so nothing averaged in


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
                                                 r"run.*Nothing was written for this seed\. "
                                                 r"Lower further_optimizer\.lr"):
        attribute(cfg)
    gold = RunDir.from_config(cfg).gold_dir(further_training_key(cfg))
    assert not list(gold.glob("seed_*.safetensors"))


def test_sane_range_check_accepts_the_runs_of_a_default_gold_standard(tiny):
    """The same problem at the default further-training lr is untouched: every seed written."""
    train(compose_config("train", tiny))
    cfg = compose_config("attribute", tiny + ["method=further_training"])
    attribute(cfg)
    gold = RunDir.from_config(cfg).gold_dir(further_training_key(cfg))
    assert sorted(p.name for p in gold.glob("seed_*.safetensors")) == ["seed_00000.safetensors",
                                                                       "seed_00001.safetensors"]


def test_a_gold_standard_without_variation_is_refused_not_reported_complete(tiny):
    """further_optimizer.lr=1e-20 moves no weight: every left-out instance changes every test
    loss by the same amount (zero), which ranks nothing. The stage refuses it (a user error: one
    message naming the fix), also when re-run on the cached seeds."""
    train(compose_config("train", tiny))
    cfg = compose_config("attribute", tiny + ["method=further_training", "further_optimizer.lr=1e-20",
                                              "further_training.n_seeds=1"])
    for _ in range(2):  # computed, then found on disk
        with pytest.raises(RefusedError, match=r"has no variation: .* ranks nothing; .* Raise further_optimizer\.lr"):
            attribute(cfg)
    attribute(compose_config("attribute", tiny + ["method=grad_dot"]))
    with pytest.raises(RefusedError, match=r"has no variation: .* ranks nothing"):  # nor evaluated from disk
        evaluate(compose_config("evaluate", tiny + ["further_optimizer.lr=1e-20", "further_training.n_seeds=1"]))


def test_sane_range_is_ten_times_the_final_mean_test_loss_plus_one():

    initial = torch.tensor([0.1, 0.3], dtype=torch.float64)  # mean 0.2: limit 10 * 0.2 + 1 = 3
    full = torch.full((2, 2), 0.25, dtype=torch.float64)
    lo = torch.full((2, 2, 3), 0.25, dtype=torch.float64)
    lo[1, 0, 1] = 5.9  # one test instance far up, the run's mean 3.075 > 3: diverged
    lo[1, 0, 2] = 5.7  # mean 2.975: a large but legitimate excursion
    with pytest.raises(FloatingPointError, match=r"seed 7: the runs leaving out training instances \[11\]\."):
        FurtherTraining._check_finite(7, full, lo, [10, 11, 12], initial)
    lo[1, 0, 1] = 5.7
    FurtherTraining._check_finite(7, full, lo, [10, 11, 12], initial)


# ------------------------------------------------------------------ settings the job checks
def test_batchnorm_momentum_zero_freezes_running_statistics(tmp_path):
    """With further_training.batchnorm_momentum=0 the runs normalise with batch statistics but
    never move the running statistics that evaluation uses; the stacked engine still equals
    the reference, the model given is untouched, and the result differs from the default."""
    torch.manual_seed(0)
    bn_model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)).to(F64)
    before = {k: v.clone() for k, v in bn_model.state_dict().items()}
    out = {}
    for label, extra in {"frozen": ["further_training.batchnorm_momentum=0"], "default": [],
                         "frozen_ref": ["further_training.batchnorm_momentum=0",
                                        "further_training.engine=reference"]}.items():
        cfg, problem = toy_problem(["further_optimizer.lr=0.1", *extra])
        problem.model = bn_model
        job_for(cfg).run(problem, tmp_path / label)
        out[label] = load_gold_standard(tmp_path / label).diff
        out[label + "_key"] = further_training_key(cfg)
    assert all(torch.equal(v, bn_model.state_dict()[k]) for k, v in before.items())
    assert float((out["frozen"] - out["frozen_ref"]).abs().max()) < 1e-12
    assert float((out["frozen"] - out["default"]).abs().max()) > 1e-6
    assert out["frozen_key"] == out["frozen_ref_key"] != out["default_key"]


def test_batchnorm_momentum_errors(tmp_path):
    cfg, problem = toy_problem(["further_training.batchnorm_momentum=0"])
    with pytest.raises(ValueError, match="no batch-norm layers; leave it null"):
        job_for(cfg).run(problem, tmp_path / "mlp")
    cfg, problem = toy_problem(["further_training.batchnorm_momentum=1.5"])
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        job_for(cfg).run(problem, tmp_path / "bad")


def test_checkpoint_interval_longer_than_training_is_a_clear_error(tmp_path):
    cfg, problem = toy_problem(["further_training.checkpoint_every_steps=100"])  # 2 epochs of 4 steps
    with pytest.raises(ValueError, match="checkpoint_every_steps=100 exceeds the 8 steps"):
        job_for(cfg).run(problem, tmp_path / "g")


# ------------------------------------------------------------------ progress
def _tiny_problem(n_left_out: int = 5) -> AttributionProblem:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 4, generator=g, dtype=torch.float64), torch.randint(0, 2, (24,), generator=g)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)).double()
    return AttributionProblem(model=model, task="classification", x_train=x, y_train=y, x_test=x[:3], y_test=y[:3],
                              left_out_indices=torch.arange(n_left_out) * 4, test_indices=torch.arange(3))


def test_one_progress_bar_over_seeds_and_groups_and_no_lightning_banners(tmp_path, capfd, caplog):
    cfg = compose_config("further_train", ["further_training.epochs=2", "further_training.batch_size=8",
                                           "further_training.n_seeds=2", "further_training.max_runs_per_group=2",
                                           "further_training.progress_bar=true"])
    with caplog.at_level(logging.INFO):
        seeds = job_for(cfg).run(_tiny_problem(), tmp_path)
    assert seeds == [0, 1]
    err = capfd.readouterr().err
    # 6 runs (the full run and 5 left out) in groups of 2: 3 groups per seed
    for seed in (1, 2):
        for group in (1, 2, 3):
            assert f"seed {seed}/2 · group {group}/3" in err
    assert "6/6" in err
    for noise in ("GPU available", "TPU available", "litlogger", "`Trainer.fit` stopped", "LeafSpec", "Epoch 1"):
        assert noise not in err
        assert not any(noise in r.getMessage() for r in caplog.records)


def test_progress_bar_off_prints_nothing(tmp_path, capfd):
    cfg = compose_config("further_train", ["further_training.epochs=1", "further_training.batch_size=8",
                                           "further_training.n_seeds=1", "trainer.progress_bar=false"])
    job_for(cfg).run(_tiny_problem(), tmp_path)
    assert "seed 1/1" not in capfd.readouterr().err
