"""The stacked further-training engine (tda.further_training.engine, stacked, optim) equals the
plain reference (tda.further_training.reference: one model, one torch.optim optimizer, PyTorch's
RandomSampler) for every removal mode, optimizer, model kind and execution path."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers.further_training import F64, data, mlp
from torch import nn
from torch.utils.data import RandomSampler

from tda.further_training.engine import GroupTrainer, plan_step
from tda.further_training.optim import StackedOptimizer, clip_grad_norm_per_run, optimizer_spec
from tda.further_training.reference import epoch_permutations, further_train_run
from tda.further_training.stacked import FuncStacked, MLPStacked, build_stacked
from tda.models.cnn import SmallCNN
from tda.models.mlp import MLP
from tda.models.structure import sparse_rows

OPTIMIZERS = {
    "sgd_momentum": {"_target_": "torch.optim.SGD", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.01},
    "sgd_nesterov": {"_target_": "torch.optim.SGD", "lr": 0.05, "momentum": 0.8, "nesterov": True},
    "adam": {"_target_": "torch.optim.Adam", "lr": 0.01, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01},
    "adamw": {"_target_": "torch.optim.AdamW", "lr": 0.01, "betas": [0.8, 0.99], "eps": 1e-8, "weight_decay": 0.1},
}


def torch_opt(node):
    kind, hp = optimizer_spec(node)
    return functools.partial(getattr(torch.optim, kind), **hp)


def reference_losses(model, opt_node, x, y, xt, yt, left_out, removal, epochs=2, batch=8, seed=3, clip=None,
                     checkpoint_every=None, task="classification"):
    """[T, n_test, 1 + n_left_out] from the plain loop, full run first."""
    kw = dict(optimizer=torch_opt(opt_node), x=x, y=y, x_test=xt, y_test=yt, task=task, n_epochs=epochs, seed=seed,
              batch_size=batch, removal=removal, checkpoint_every=checkpoint_every, clip_grad_norm=clip)
    runs = [further_train_run(model, left_out=None, **kw)]
    runs += [further_train_run(model, left_out=j, **kw) for j in left_out]
    return torch.stack(runs, dim=-1)


def engine_losses(model, opt_node, x, y, xt, yt, left_out, removal, epochs=2, batch=8, seed=3, clip=None,
                  checkpoint_every=None, task="classification", fast_path=True, sparse_input="auto", vmap="auto"):
    kind, hp = optimizer_spec(opt_node)
    R = 1 + len(left_out)
    stacked = build_stacked(model, R, x, y, task, fast_path=fast_path, sparse_input=sparse_input, vmap=vmap)
    gt = GroupTrainer(stacked, kind, hp, epoch_permutations(len(x), epochs, seed),
                      torch.tensor([-1, *left_out]), torch.tensor([True] + [False] * len(left_out)), batch, removal,
                      seed, xt, yt, clip_grad_norm=clip, checkpoint_every=checkpoint_every)
    return gt.run(epochs), stacked


def assert_same_differences(ref, eng, tol=1e-12):
    assert ref.shape == eng.shape
    d_ref = ref[..., 1:] - ref[..., :1]
    d_eng = eng[..., 1:] - eng[..., :1]
    assert float(d_ref.abs().max()) > 1e-6, "the test does not exercise any effect of leaving out"
    err = float((d_ref - d_eng).abs().max())
    assert err <= tol, f"loss differences differ by {err:.3g}"
    assert float((ref - eng).abs().max()) <= tol


def test_permutations_are_what_random_sampler_yields():
    g = torch.Generator().manual_seed(11)
    sampler = RandomSampler(range(20), generator=g)
    expected = [list(sampler) for _ in range(3)]
    assert [p.tolist() for p in epoch_permutations(20, 3, 11)] == expected
    # the sampler draws two permutations per epoch: naively re-deriving them would be wrong
    g2 = torch.Generator().manual_seed(11)
    naive = [torch.randperm(20, generator=g2).tolist() for _ in range(3)]
    assert naive[1] != expected[1]


def test_drop_plan_deletes_left_out_and_shifts():
    perm = torch.tensor([5, 2, 7, 0, 3, 6, 1, 4, 8])  # n = 9, batch 4: batches of 4, 4, 1
    left_out = torch.tensor([-1, 7, 8])
    is_full = torch.tensor([True, False, False])
    inv = torch.empty(9, dtype=torch.long)
    inv[perm] = torch.arange(9)
    pos = torch.where(is_full, torch.tensor(9), inv[left_out.clamp_min(0)])
    seen = {r: [] for r in range(3)}
    for b in range(3):
        groups, active = plan_step(perm, pos, left_out, is_full, b, 4, "drop", 0.1, F64)
        for g in groups:
            for r, row in zip(g.rows.tolist(), g.idx.tolist()):
                assert active[r]
                seen[r].append(row)
    assert seen[0] == [[5, 2, 7, 0], [3, 6, 1, 4], [8]]
    assert seen[1] == [[5, 2, 0, 3], [6, 1, 4, 8]]  # its epoch is one batch shorter
    assert seen[2] == [[5, 2, 7, 0], [3, 6, 1, 4]]


@pytest.mark.parametrize("removal", ["drop", "downweight", "mask"])
@pytest.mark.parametrize("opt", ["sgd_momentum", "adam", "adamw"])
def test_mlp_engine_equals_reference(removal, opt):
    x, y, xt, yt = data()
    model = mlp(6)
    left_out = [0, 36, 17, 30]  # includes rows of the last, shorter batch
    clip = 0.5 if opt != "sgd_momentum" else None
    ref = reference_losses(model, OPTIMIZERS[opt], x, y, xt, yt, left_out, removal, clip=clip)
    eng, stacked = engine_losses(model, OPTIMIZERS[opt], x, y, xt, yt, left_out, removal, clip=clip)
    assert isinstance(stacked, MLPStacked)
    assert_same_differences(ref, eng)


@pytest.mark.parametrize("opt", ["sgd_nesterov", "adam"])
def test_epoch_one_batch_shorter_and_step_checkpoints(opt):
    """n % batch == 1: a `drop` run's epoch has one batch fewer (it sits out the last step);
    checkpoints every 3 steps of the full run's clock."""
    x, y, xt, yt = data(n=33)
    model = mlp(6)
    left_out = [4, 32]
    ref = reference_losses(model, OPTIMIZERS[opt], x, y, xt, yt, left_out, "drop", epochs=3, checkpoint_every=3)
    eng, _ = engine_losses(model, OPTIMIZERS[opt], x, y, xt, yt, left_out, "drop", epochs=3, checkpoint_every=3)
    assert ref.shape[0] == 5
    assert_same_differences(ref, eng)


@pytest.mark.parametrize("removal", ["drop", "downweight"])
def test_sparse_one_hot_first_layer_equals_reference_and_dense(removal):
    x, y, xt, yt = data(onehot=True)
    model = mlp(x.shape[1])
    left_out = [3, 35, 9]
    ref = reference_losses(model, OPTIMIZERS["adam"], x, y, xt, yt, left_out, removal, clip=1.0)
    sparse, st = engine_losses(model, OPTIMIZERS["adam"], x, y, xt, yt, left_out, removal, clip=1.0, sparse_input=True)
    dense, sd = engine_losses(model, OPTIMIZERS["adam"], x, y, xt, yt, left_out, removal, clip=1.0, sparse_input=False)
    assert st.sparse and not sd.sparse
    assert_same_differences(ref, sparse)
    assert_same_differences(dense, sparse)


def test_sparse_rows_reconstruct_the_input():
    x, *_ = data(onehot=True)
    cols, vals = sparse_rows(x)
    assert cols.shape[1] == 4
    back = torch.zeros_like(x).scatter_add_(1, cols, vals)
    assert torch.equal(back, x)


@pytest.mark.parametrize("removal,vmap", [("drop", True), ("downweight", False), ("mask", True)])
def test_cnn_engine_equals_reference(removal, vmap):
    x, y, xt, yt = data(n=21, image=True)
    torch.manual_seed(0)
    model = SmallCNN([1, 8, 8], 3, channels=(2, 3)).to(F64)
    left_out = [20, 5]
    opt = {"sgd_momentum": "drop", "adam": "downweight", "adamw": "mask"}
    name = next(k for k, v in opt.items() if v == removal)
    ref = reference_losses(model, OPTIMIZERS[name], x, y, xt, yt, left_out, removal, batch=6, clip=0.7)
    eng, stacked = engine_losses(model, OPTIMIZERS[name], x, y, xt, yt, left_out, removal, batch=6, clip=0.7, vmap=vmap)
    assert isinstance(stacked, FuncStacked) and stacked.vectorize == vmap
    assert_same_differences(ref, eng)


@pytest.mark.parametrize("removal", ["drop", "mask", "downweight"])
def test_token_id_inputs_train_in_the_reference_and_the_engine(removal):
    """Integer inputs (token ids) must not turn the loss weights into integers (all zero)."""
    g = torch.Generator().manual_seed(0)
    x, xt = torch.randint(0, 11, (19, 3), generator=g), torch.randint(0, 11, (4, 3), generator=g)
    y, yt = torch.randint(0, 2, (19,), generator=g), torch.randint(0, 2, (4,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(11, 4), nn.Flatten(), nn.Linear(12, 2)).to(F64)
    ref = reference_losses(model, OPTIMIZERS["sgd_momentum"], x, y, xt, yt, [3, 7], removal, batch=5)
    eng, _ = engine_losses(model, OPTIMIZERS["sgd_momentum"], x, y, xt, yt, [3, 7], removal, batch=5, vmap=False)
    assert_same_differences(ref, eng)


@pytest.mark.parametrize("removal,vmap", [("drop", True), ("mask", True), ("drop", False)])
def test_dropout_masks_are_matched_like_the_reference(removal, vmap):
    """Generic path (vmap, randomness='same') with dropout: every run of a step draws the
    mask the reference draws for that batch shape."""
    x, y, xt, yt = data()
    model = mlp(6, dropout=0.3)
    left_out = [36, 2]
    ref = reference_losses(model, OPTIMIZERS["sgd_momentum"], x, y, xt, yt, left_out, removal)
    eng, stacked = engine_losses(model, OPTIMIZERS["sgd_momentum"], x, y, xt, yt, left_out, removal, vmap=vmap)
    assert isinstance(stacked, FuncStacked)  # dropout > 0 is not a plain Linear/ReLU stack
    assert_same_differences(ref, eng)


@pytest.mark.parametrize("vmap", [True, False])
def test_batchnorm_buffers_are_per_run(vmap):
    """Test losses are in eval mode, so they depend on each run's own running statistics."""
    x, y, xt, yt = data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)).to(F64)
    left_out = [36, 2]
    ref = reference_losses(model, OPTIMIZERS["adam"], x, y, xt, yt, left_out, "drop")
    eng, stacked = engine_losses(model, OPTIMIZERS["adam"], x, y, xt, yt, left_out, "drop", vmap=vmap)
    assert_same_differences(ref, eng)
    running = stacked.buffers[stacked.buffer_names.index("1.running_mean")]
    assert not torch.equal(running[0], running[1])  # each run kept its own statistics


def test_regression_mlp():
    x, _, xt, _ = data()
    y, yt = x[:, 0] * 2 - x[:, 1], xt[:, 0] * 2 - xt[:, 1]
    torch.manual_seed(0)
    model = MLP([6], 1, hidden=(4,)).to(F64)
    ref = reference_losses(model, OPTIMIZERS["sgd_momentum"], x, y, xt, yt, [1, 36], "drop", task="regression")
    eng, _ = engine_losses(model, OPTIMIZERS["sgd_momentum"], x, y, xt, yt, [1, 36], "drop", task="regression")
    assert_same_differences(ref, eng)


def test_stacked_optimizer_sit_out_keeps_state():
    torch.manual_seed(0)
    p = torch.randn(3, 4, dtype=F64)
    ref = [p[r].clone().requires_grad_() for r in range(3)]
    opts = [torch.optim.Adam([t], lr=0.1) for t in ref]
    stacked = StackedOptimizer("Adam", {"lr": 0.1}, [p])
    for step in range(4):
        g = torch.randn(3, 4, dtype=F64)
        active = torch.tensor([True, step != 1, True])
        clip_grad_norm_per_run([g], 1.0)
        stacked.step([g.clone()], active)
        for r in range(3):
            if active[r]:
                ref[r].grad = g[r].clone()
                opts[r].step()
    assert torch.allclose(p, torch.stack([t.detach() for t in ref]), atol=1e-14, rtol=0)


def test_unsupported_optimizer_is_a_clear_error():
    with pytest.raises(ValueError, match="engine=reference"):
        optimizer_spec({"_target_": "torch.optim.RMSprop", "lr": 0.1})
    with pytest.raises(ValueError, match="amsgrad"):
        optimizer_spec({"_target_": "torch.optim.Adam", "lr": 0.1, "amsgrad": True})


def test_vmap_auto_follows_the_trainer_device():
    """`vmap: auto` loops over the runs of a convolutional model on CPU and vectorises them on
    a GPU; the Trainer's accelerator `auto` means a GPU when there is one."""
    x = torch.randn(8, 1, 8, 8)
    y = torch.randint(0, 3, (8,))
    cnn = SmallCNN([1, 8, 8], 3, channels=(2, 3))
    assert build_stacked(cnn, 2, x, y, "classification", device="cpu").vectorize is False
    assert build_stacked(cnn, 2, x, y, "classification", device="gpu").vectorize is True
    assert build_stacked(cnn, 2, x, y, "classification", device="auto").vectorize is torch.cuda.is_available()
    assert build_stacked(cnn, 2, x, y, "classification", device="cpu", vmap=True).vectorize is True
