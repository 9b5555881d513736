"""The checkpoint schedule (tda.further_training.checkpoints): the steps it lists, checked against
hand-written lists (the authors' SST-2 steps among them); every engine records exactly the plain
loop's state at those steps, with the full-data run's distance from the start; the gold standard
on disk names its steps and carries the distance; refusals; old keys unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.config import compose_config
from helpers.further_training import F64, data, job_for, mlp, toy_problem
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from tda.artifacts import load_tensors_with_metadata, save_tensors
from tda.config import ConfigError
from tda.further_training.checkpoints import checkpoint_steps
from tda.further_training.derivative import WeightedTrajectory
from tda.further_training.engine import GroupTrainer
from tda.further_training.optim import optimizer_spec
from tda.further_training.reference import epoch_permutations, further_train_record, further_train_run
from tda.further_training.settings import FurtherTrainingSettings
from tda.further_training.stacked import build_stacked
from tda.further_training.store import further_training_key, load_gold_standard, seed_file

ADAM = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 0.01}
# 30 rows in batches of 8: 4 steps an epoch, 2 epochs = 8 steps; every 3 from step 1, and the last
SCHEDULE = {"checkpoint_every": 3, "checkpoint_first": 1, "checkpoint_last": True}
STEPS = [1, 4, 7, 8]


# ------------------------------------------------------------------ the steps
def test_checkpoint_steps_against_hand_written_lists():
    assert checkpoint_steps(24, 8) == [8, 16, 24]  # null: after every epoch
    assert checkpoint_steps(23, 8, every=5) == [5, 10, 15, 20]
    assert checkpoint_steps(23, 8, every=5, first=6) == [6, 11, 16, 21]
    assert checkpoint_steps(23, 8, every=5, first=6, last=True) == [6, 11, 16, 21, 23]
    assert checkpoint_steps(21, 7, every=5, first=6, last=True) == [6, 11, 16, 21]  # the last step already is one
    assert checkpoint_steps(23, 8, every=5, last=True) == [5, 10, 15, 20, 23]
    assert checkpoint_steps(23, 8, every=30, first=2) == [2]
    assert checkpoint_steps(24, 8, last=True) == [8, 16, 24]
    # the authors' SST-2 schedule: one epoch of 1,053 steps, checkpoints at 6, 11, ..., 1051 and 1053
    sst2 = checkpoint_steps(1053, 1053, every=5, first=6, last=True)
    assert sst2[:4] == [6, 11, 16, 21] and sst2[-3:] == [1046, 1051, 1053] and len(sst2) == 211
    assert all(b - a == 5 for a, b in zip(sst2[:-2], sst2[1:-1]))


def test_the_sst2_experiments_use_the_authors_schedule():
    for name, n_train in (("sst2_adamw", 67_349), ("sst2_adamw_cpu", 8_000)):
        cfg = compose_config("train", [f"experiment={name}"])
        steps = FurtherTrainingSettings.from_config(cfg.further_training).checkpoint_steps(n_train)
        total = -(-n_train // 64)
        assert steps == [*range(6, total, 5), total], name


def test_schedule_refusals(tmp_path):
    with pytest.raises(ValueError, match=r"checkpoint_first_step=9 is not one of the 8 steps of further training "
                                         r"\(2 epochs of 4\); choose a step in 1..8"):
        checkpoint_steps(8, 4, every=3, first=9)
    with pytest.raises(ValueError, match=r"checkpoint_every_steps=9 exceeds the 8 steps"):
        checkpoint_steps(8, 4, every=9)
    with pytest.raises(ValueError, match=r"checkpoint_first_step=2 needs further_training.checkpoint_every_steps"):
        checkpoint_steps(8, 4, first=2)
    with pytest.raises(ConfigError, match=r"further_training.checkpoint_first_step=0 must be positive"):
        FurtherTrainingSettings(checkpoint_every_steps=5, checkpoint_first_step=0)
    with pytest.raises(ConfigError, match=r"checkpoint_first_step=6 needs further_training.checkpoint_every_steps"):
        FurtherTrainingSettings(checkpoint_first_step=6)
    with pytest.raises(ConfigError, match=r"checkpoint_last_step='yes' is a str, but it must be a bool"):
        FurtherTrainingSettings(checkpoint_last_step="yes")
    # the job refuses before any work; the stages list it with the data's other problems
    cfg, problem = toy_problem(["further_training.checkpoint_every_steps=3",
                                "further_training.checkpoint_first_step=9"])
    with pytest.raises(ValueError, match=r"checkpoint_first_step=9 is not one of the 8 steps"):
        job_for(cfg).run(problem, tmp_path / "gold")
    assert not (tmp_path / "gold").exists()
    assert FurtherTrainingSettings(checkpoint_every_steps=3, checkpoint_first_step=9, batch_size=8,
                                   epochs=2).fit_problems(6, 30) == [
        "further_training.checkpoint_first_step=9 is not one of the 8 steps of further training (2 epochs of 4); "
        "choose a step in 1..8 or null (the step checkpoint_every_steps=3)"]


# ------------------------------------------------------------------ every engine at the schedule's steps
def plain_full_run(model, x, y, xt, yt, epochs, batch, seed):
    """The full-data run written out: torch.optim.Adam, a seeded RandomSampler; after every step
    the test losses [steps, n_test] and ‖θ − θ_0‖₂ over the trainable parameters [steps]."""
    model = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=ADAM["lr"])
    loader = DataLoader(TensorDataset(x, y), batch_size=batch,
                        sampler=RandomSampler(range(len(x)), generator=torch.Generator().manual_seed(seed)))
    losses, distance = [], []
    for _ in range(epochs):
        for xb, yb in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
            with torch.no_grad():
                losses.append(torch.nn.functional.cross_entropy(model(xt), yt, reduction="none"))
                distance.append(torch.sqrt(sum(((p - s) ** 2).sum() for p, s in zip(params, start))))
    return torch.stack(losses), torch.stack(distance)


@pytest.fixture(scope="module")
def setting():
    x, y, xt, yt = data(n=30)
    model = mlp(6)
    left_out = [3, 17, 29]
    full, distance = plain_full_run(model, x, y, xt, yt, epochs=2, batch=8, seed=5)
    kw = dict(optimizer=lambda p: torch.optim.Adam(p, lr=ADAM["lr"]), x=x, y=y, x_test=xt, y_test=yt,
              task="classification", n_epochs=2, seed=5, batch_size=8, removal="drop")
    every_step = [further_train_run(model, left_out=j, checkpoint_every=1, **kw) for j in left_out]
    return dict(x=x, y=y, xt=xt, yt=yt, model=model, left_out=left_out, kw=kw, rows=torch.tensor(STEPS) - 1,
                full=full, distance=distance, left_out_losses=torch.stack(every_step, -1))


def test_the_plain_loop_is_the_reference_engine(setting):
    s = setting
    rec = further_train_record(s["model"], left_out=None, checkpoint_every=1, **s["kw"])
    assert float((rec.losses - s["full"]).abs().max()) < 1e-12
    assert float((rec.distance_from_start - s["distance"]).abs().max()) < 1e-12


def test_reference_engine_records_at_the_schedules_steps(setting):
    s = setting
    rec = further_train_record(s["model"], left_out=None, **SCHEDULE, **s["kw"])
    assert rec.steps == STEPS
    assert float((rec.losses - s["full"][s["rows"]]).abs().max()) < 1e-12
    assert float((rec.distance_from_start - s["distance"][s["rows"]]).abs().max()) < 1e-12
    lo = torch.stack([further_train_run(s["model"], left_out=j, **SCHEDULE, **s["kw"]) for j in s["left_out"]], -1)
    assert float((lo - s["left_out_losses"][s["rows"]]).abs().max()) < 1e-12


@pytest.mark.parametrize("fast_path", [True, False], ids=["linear_relu", "torch_func"])
def test_stacked_engine_records_at_the_schedules_steps(setting, fast_path):
    s = setting
    kind, hp = optimizer_spec(ADAM)
    runs = torch.tensor([-1, *s["left_out"]])
    stacked = build_stacked(s["model"], len(runs), s["x"], s["y"], "classification", fast_path=fast_path)
    gt = GroupTrainer(stacked, kind, hp, epoch_permutations(30, 2, 5), runs, runs < 0, 8, "drop", 5, s["xt"], s["yt"],
                      **SCHEDULE)
    losses = gt.run(2)  # [T, n_test, runs]
    assert gt.checkpoint_steps == STEPS
    assert float((losses[..., 0] - s["full"][s["rows"]]).abs().max()) < 1e-12
    assert float((losses[..., 1:] - s["left_out_losses"][s["rows"]]).abs().max()) < 1e-12
    assert float((gt.distance_from_start() - s["distance"][s["rows"]]).abs().max()) < 1e-12


@pytest.mark.parametrize("fast_path", [True, False], ids=["linear_relu", "torch_func"])
def test_derivative_engine_records_at_the_schedules_steps(setting, fast_path):
    s = setting

    def trajectory(**schedule):
        settings = FurtherTrainingSettings(epochs=2, batch_size=8, removal="mask", **schedule)
        return WeightedTrajectory(s["model"], ADAM, s["x"], s["y"], s["xt"], s["yt"], "classification", settings, 5,
                                  fast_path=fast_path)

    traj = trajectory(checkpoint_every_steps=3, checkpoint_first_step=1, checkpoint_last_step=True)
    every_step = trajectory(checkpoint_every_steps=1)
    assert traj.checkpoint_steps == STEPS
    assert float((traj.losses() - s["full"][s["rows"]]).abs().max()) < 1e-12
    forward, forward_all = traj.forward_mode(s["left_out"]), every_step.forward_mode(s["left_out"])
    reverse = traj.reverse_mode()
    for result in (forward, reverse):
        assert result.steps == STEPS
        assert float((result.full_loss - s["full"][s["rows"]]).abs().max()) < 1e-12
        assert float((result.distance_from_start - s["distance"][s["rows"]]).abs().max()) < 1e-12
    assert float(forward_all.derivative.abs().max()) > 1e-4
    assert float((forward.derivative - forward_all.derivative[s["rows"]]).abs().max()) < 1e-12
    assert float((reverse.derivative[..., s["left_out"]] - forward.derivative).abs().max()) < 1e-10


# ------------------------------------------------------------------ the gold standard on disk
SCHEDULE_KEYS = ["further_training.checkpoint_every_steps=3", "further_training.checkpoint_first_step=1",
                 "further_training.checkpoint_last_step=true", "further_optimizer=adam", "further_optimizer.lr=0.01"]


@pytest.mark.parametrize("extra", [[], ["further_training.engine=reference"],
                                   ["further_training.estimator=derivative", "further_training.removal=mask"]],
                         ids=["stacked", "reference", "derivative"])
def test_gold_standard_names_its_steps_and_carries_the_distance(tmp_path, extra):
    cfg, problem = toy_problem([*SCHEDULE_KEYS, *extra])
    job_for(cfg).run(problem, tmp_path)
    gold = load_gold_standard(tmp_path)
    assert gold.checkpoint_axis() == ("step", [float(s) for s in STEPS])
    assert gold.diff.shape == (4, 5, 6, 3) and gold.distance_from_start.shape == (4, 3)
    model = problem.model.to(F64)
    for i, seed in enumerate(gold.seeds):
        losses, distance = plain_full_run(model, problem.x_train, problem.y_train, problem.x_test, problem.y_test,
                                          epochs=2, batch=8, seed=seed)
        assert float((gold.full_loss[..., i] - losses[torch.tensor(STEPS) - 1]).abs().max()) < 1e-12
        assert float((gold.distance_from_start[:, i] - distance[torch.tensor(STEPS) - 1]).abs().max()) < 1e-12


def test_left_out_parts_carry_the_distance_and_old_files_load_without_it(tmp_path):
    for index in (0, 1):
        cfg, problem = toy_problem(["further_training.left_out_shard.count=2",
                                    f"further_training.left_out_shard.index={index}"])
        job_for(cfg).run(problem, tmp_path)
    whole_cfg, whole_problem = toy_problem([])
    job_for(whole_cfg).run(whole_problem, tmp_path / "whole")
    parts, whole = load_gold_standard(tmp_path), load_gold_standard(tmp_path / "whole")
    assert parts.distance_from_start.shape == (2, 3)
    assert float((parts.distance_from_start - whole.distance_from_start).abs().max()) < 1e-12
    assert float(whole.distance_from_start.min()) > 0
    # a seed file written before the distance was recorded: the gold standard loads, without it
    path = seed_file(tmp_path / "whole", 1)
    tensors, header, _ = load_tensors_with_metadata(path)
    del tensors["distance_from_start"]
    save_tensors(path, tensors, metadata=header)
    old = load_gold_standard(tmp_path / "whole")
    assert old.distance_from_start is None and torch.equal(old.diff, whole.diff)


def test_new_settings_at_their_defaults_leave_the_gold_standard_key_unchanged():
    """Gold standards computed before the schedule keys and `start` existed keep their directories."""
    for overrides in ([], ["experiment=folktables_sgd_cpu"], ["further_training.checkpoint_every_steps=5"]):
        cfg = compose_config("attribute", overrides)
        old = copy.deepcopy(cfg)
        OmegaConf.set_struct(old, False)
        for key in ("checkpoint_first_step", "checkpoint_last_step", "start"):
            del old.further_training[key]
        assert further_training_key(cfg) == further_training_key(old)
    cfg = compose_config("attribute", ["further_training.checkpoint_every_steps=5"])
    assert further_training_key(compose_config("attribute", ["further_training.checkpoint_every_steps=5",
                                                             "further_training.checkpoint_first_step=6"])) \
        != further_training_key(cfg)
