"""First-order methods: per-example gradients (materialised and factored), Grad-Dot, Grad-Cos, DataInf,
TRAK and Adam-preconditioned Grad-Dot, each against a slow explicit reference written here
(one autograd call per instance, explicit vectors, Python loops), plus the first-order limit
of the gold standard and optional cross-checks against dattri / traker."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers.config import compose_config
from torch import nn

from tda.artifacts import load_json, load_tensors
from tda.further_training.reference import further_train_run
from tda.methods.datainf import DataInf
from tda.methods.grad_dot import GradCos, GradDot
from tda.methods.grad_dot_adam import GradDotAdam, adam_second_moment
from tda.methods.gradients import (
    DenseGrads,
    ParamLayout,
    compute_grads,
    iter_grad_chunks,
    linear_factors,
    loss_target,
    margin_target,
    per_example_grads,
    tensor_kernels,
    tensor_moments,
    tensor_sq_norms,
)
from tda.methods.trak import TRAK, projection_matrix
from tda.models.base import per_example_loss
from tda.models.cnn import SmallCNN
from tda.models.mlp import MLP
from tda.problem import AttributionProblem
from tda.stages import attribute, train

torch.set_default_dtype(torch.float32)


# ------------------------------------------------------------------------------ fixtures
def onehot_data(n, groups=(5, 7, 4, 6), seed=0, dtype=torch.float64):
    """Tabular one-hot rows: one active category per group (sparse, like Folktables)."""
    g = torch.Generator().manual_seed(seed)
    cols = []
    for k in groups:
        cols.append(torch.nn.functional.one_hot(torch.randint(0, k, (n,), generator=g), k))
    x = torch.cat(cols, dim=1).to(dtype)
    noise = 0.5 * torch.randn(n, generator=g, dtype=dtype)
    y = (x @ torch.randn(x.shape[1], generator=g, dtype=dtype) + noise > 0).long()
    return x, y


def make_problem(model, x, y, x_test, y_test, left_out, task="classification", budget=2048.0):
    return AttributionProblem(model=model, task=task, x_train=x, y_train=y, x_test=x_test, y_test=y_test,
                              left_out_indices=torch.as_tensor(left_out), test_indices=torch.arange(len(x_test)),
                              memory_budget_mb=budget)


def mlp_problem(n=60, task="classification", trainable="all", seed=0, budget=2048.0):
    x, y = onehot_data(n + 7, seed=seed)
    torch.manual_seed(seed)
    model = MLP([x.shape[1]], 2 if task == "classification" else 1, hidden=(6, 5), trainable=trainable).double()
    model.freeze_non_trainable()
    model.eval()
    if task == "regression":
        y = y.double() + 0.3 * x[:, 0]
    frozen, trainable_part = model.split()
    feats = x if frozen is None else frozen(x).detach()
    return make_problem(trainable_part, feats[:n], y[:n], feats[n:], y[n:], [0, 3, 5, 11, 20, 41], task, budget)


def cnn_problem(n=30):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n + 4, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n + 4,), generator=g)
    torch.manual_seed(1)
    model = SmallCNN([1, 8, 8], 3, channels=(2, 3)).double().eval()
    return make_problem(model, x[:n], y[:n], x[n:], y[n:], [1, 2, 9, 17])


# ------------------------------------------------------------------------------ references
def ref_grad(model, x_i, y_i, fn) -> torch.Tensor:
    """One explicit autograd call for one instance -> flat gradient over trainable params."""
    params = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    val = fn(model(x_i.unsqueeze(0)), y_i.unsqueeze(0)).sum()
    return torch.cat([g.flatten() for g in torch.autograd.grad(val, params)]).detach()


def ref_grads(model, x, y, fn=None, task="classification"):
    fn = fn or (lambda o, t: per_example_loss(o, t, task))
    return torch.stack([ref_grad(model, x[i], y[i], fn) for i in range(len(x))])


def ref_tensor_slices(model):
    out, o = [], 0
    for p in model.parameters():
        if p.requires_grad:
            out.append(slice(o, o + p.numel()))
            o += p.numel()
    return out


def cos(a, b):
    return float((a.flatten() @ b.flatten()) / (a.norm() * b.norm()))


# ------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("trainable", ["all", "head", "last_k"])
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_factored_gradients_equal_materialised(trainable, task):
    p = mlp_problem(task=task, trainable=trainable)
    ref = ref_grads(p.model, p.x_train, p.y_train, task=task)
    fac = linear_factors(p.model, p.x_train, p.y_train, loss_target(task))
    torch.testing.assert_close(fac.dense(), ref, rtol=1e-10, atol=1e-12)
    if trainable == "all":
        sp = linear_factors(p.model, p.x_train, p.y_train, loss_target(task), sparse_inputs=True)
        assert sp.layers[0].A.layout == torch.sparse_csr  # one-hot inputs stored sparse
        torch.testing.assert_close(sp.dense(), ref, rtol=1e-10, atol=1e-12)
        for a, b in [(tensor_kernels(sp, fac), tensor_kernels(fac, fac)), (tensor_sq_norms(sp), tensor_sq_norms(fac)),
                     (tensor_moments(sp)[1], tensor_moments(fac)[1])]:
            for k in a:
                torch.testing.assert_close(a[k], b[k], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(per_example_grads(p.model, p.x_train, p.y_train, task), ref, rtol=1e-10, atol=1e-12)
    dense = DenseGrads(ref, ParamLayout.of(p.model))
    fac_t = linear_factors(p.model, p.x_test, p.y_test, loss_target(task))
    dense_t = DenseGrads(ref_grads(p.model, p.x_test, p.y_test, task=task), dense.layout)
    for a, b in [(tensor_kernels(fac_t, fac), tensor_kernels(dense_t, dense)),
                 (tensor_sq_norms(fac), tensor_sq_norms(dense))]:
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-10, atol=1e-12)
    s1, s2 = tensor_moments(fac)
    for k, sl in zip(dense.layout.names, ref_tensor_slices(p.model)):
        torch.testing.assert_close(s1[k], ref[:, sl].sum(0), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(s2[k], ref[:, sl].pow(2).sum(0), rtol=1e-10, atol=1e-12)


def test_margin_gradients_and_cnn_fallback():
    p = mlp_problem()
    t = margin_target("classification")
    ref = ref_grads(p.model, p.x_train, p.y_train, t)
    torch.testing.assert_close(linear_factors(p.model, p.x_train, p.y_train, t).dense(), ref)
    c = cnn_problem()
    g = compute_grads(c.model, c.x_train, c.y_train, loss_target("classification"))
    assert isinstance(g, DenseGrads)  # convolutions are not factorable: vmap path
    torch.testing.assert_close(g.G, ref_grads(c.model, c.x_train, c.y_train))


def test_streaming_chunks_cover_rows_within_budget():
    p = mlp_problem(n=60)
    ref = ref_grads(p.model, p.x_train, p.y_train)
    for factored in ("auto", False):
        parts = list(iter_grad_chunks(p.model, p.x_train, p.y_train, loss_target("classification"),
                                      memory_budget_mb=0.02, factored=factored))
        assert len(parts) > 1
        assert [r.start for r, _ in parts] == sorted(r.start for r, _ in parts)
        torch.testing.assert_close(torch.cat([g.dense() for _, g in parts]), ref)
    with pytest.raises(MemoryError, match="memory_budget_mb"):
        list(iter_grad_chunks(p.model, p.x_train, p.y_train, loss_target("classification"), 1e-6, factored=False))


# ------------------------------------------------------------------------------ Grad-Dot / Grad-Cos
@pytest.mark.parametrize("factored", ["auto", False])
@pytest.mark.parametrize("which", ["mlp", "cnn"])
def test_grad_dot_and_cos_equal_explicit_loop(factored, which):
    p = mlp_problem() if which == "mlp" else cnn_problem()
    gt = ref_grads(p.model, p.x_test, p.y_test)
    gl = ref_grads(p.model, p.x_left_out, p.y_left_out)
    dot = torch.tensor([[float(gt[a] @ gl[b]) for b in range(len(gl))] for a in range(len(gt))], dtype=torch.float64)
    cs = torch.tensor([[float(gt[a] @ gl[b] / (gt[a].norm() * gl[b].norm())) for b in range(len(gl))]
                       for a in range(len(gt))], dtype=torch.float64)
    torch.testing.assert_close(GradDot(factored=factored).scores(p).double(), dot, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(GradCos(factored=factored).scores(p).double(), cs, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("removal", ["downweight", "mask"])
def test_grad_dot_is_first_order_limit_of_further_training(removal):
    """One full-batch SGD step with a tiny learning rate: the gold standard's loss differences
    must point the same way as Grad-Dot (downweight: Δloss = lr/n gᵀg_j; mask: the same up to
    a j-independent shift, removed by centring)."""
    p = mlp_problem(n=60)
    n, lr = p.n_train, 1e-4
    kw = dict(optimizer=lambda ps: torch.optim.SGD(ps, lr=lr), x=p.x_train, y=p.y_train, x_test=p.x_test,
              y_test=p.y_test, task=p.task, n_epochs=1, seed=0, batch_size=n, removal=removal)
    full = further_train_run(p.model, left_out=None, **kw)
    left_out = torch.stack([further_train_run(p.model, left_out=int(j), **kw) for j in p.left_out_indices], -1)
    diff = left_out[0] - full[0][:, None]
    s = GradDot().scores(p).double()
    if removal == "mask":
        diff, s = diff - diff.mean(1, keepdim=True), s - s.mean(1, keepdim=True)
    else:
        torch.testing.assert_close(diff, s * lr / n, rtol=1e-2, atol=1e-12)
    per_test = [cos(diff[i], s[i]) for i in range(len(s))]
    assert min(per_test) > 0.99, per_test


# ------------------------------------------------------------------------------ DataInf
def ref_datainf(model, x_tr, y_tr, x_te, y_te, x_lo, y_lo, c=10.0, damping=None, task="classification"):
    """The authors' formulation: per test instance and per tensor, a Python loop over every
    training instance accumulating the Sherman–Morrison inverse-HVP, then dot products."""
    g_tr = ref_grads(model, x_tr, y_tr, task=task)
    g_te = ref_grads(model, x_te, y_te, task=task)
    g_lo = ref_grads(model, x_lo, y_lo, task=task)
    n = len(x_tr)
    out = torch.zeros(len(x_te), len(x_lo), dtype=torch.float64)
    for sl in ref_tensor_slices(model):
        lam = damping if damping is not None else sum(float(torch.mean(g_tr[i, sl] ** 2)) for i in range(n)) / n / c
        for t in range(len(x_te)):
            v = g_te[t, sl]
            hvp = torch.zeros_like(v)
            for i in range(n):
                gi = g_tr[i, sl]
                coef = float(v @ gi) / (lam + float(gi @ gi))
                hvp += (v - coef * gi) / (n * lam)
            for j in range(len(x_lo)):
                out[t, j] += float(hvp @ g_lo[j, sl])
    return out


@pytest.mark.parametrize("kw", [{}, {"factored": False}, {"c": 3.0, "max_train_rows_per_chunk": 7},
                                {"damping": 0.05}])
def test_datainf_equals_authors_loop(kw):
    p = mlp_problem()
    ref = ref_datainf(p.model, p.x_train, p.y_train, p.x_test, p.y_test, p.x_left_out, p.y_left_out,
                      c=kw.get("c", 10.0), damping=kw.get("damping"))
    torch.testing.assert_close(DataInf(**kw).scores(p), ref, rtol=1e-8, atol=1e-10)


def test_datainf_two_pass_and_cnn_and_regression():
    p = mlp_problem(budget=1e-3)  # too little to keep C_l and D_l: second pass
    m = DataInf(max_train_rows_per_chunk=9)
    s = m.scores(p)
    assert m.record["one_pass"] is False
    torch.testing.assert_close(s, ref_datainf(p.model, p.x_train, p.y_train, p.x_test, p.y_test, p.x_left_out,
                                              p.y_left_out), rtol=1e-8, atol=1e-10)
    c = cnn_problem()
    torch.testing.assert_close(DataInf().scores(c), ref_datainf(c.model, c.x_train, c.y_train, c.x_test, c.y_test,
                                                                c.x_left_out, c.y_left_out), rtol=1e-8, atol=1e-10)
    r = mlp_problem(task="regression")
    torch.testing.assert_close(DataInf().scores(r), ref_datainf(r.model, r.x_train, r.y_train, r.x_test, r.y_test,
                                                                r.x_left_out, r.y_left_out, task="regression"),
                               rtol=1e-8, atol=1e-10)


# ------------------------------------------------------------------------------ TRAK
def ref_trak(p, proj_dim, seed, damping):
    margin = margin_target(p.task)
    layout = ParamLayout.of(p.model)
    if proj_dim is None:
        P = torch.eye(layout.n_params, dtype=torch.float64)
    else:
        blocks = projection_matrix(layout, proj_dim, seed)
        P = torch.cat([blocks[k] for k in layout.names]).double()

    def f(x, y):
        return ref_grads(p.model, x, y, margin) @ P

    phi, phi_t, phi_j = f(p.x_train, p.y_train), f(p.x_test, p.y_test), f(p.x_left_out, p.y_left_out)
    K = phi.T @ phi + damping * torch.eye(phi.shape[1], dtype=torch.float64)
    Kinv = torch.linalg.pinv(K, hermitian=True)
    out = torch.zeros(len(phi_t), len(phi_j), dtype=torch.float64)
    for a in range(len(phi_t)):
        for b in range(len(phi_j)):
            i = int(p.left_out_indices[b])
            with torch.no_grad():
                o = p.model(p.x_train[i:i + 1])
                ot = p.model(p.x_test[a:a + 1])
            if p.task == "classification":
                w = 1 - torch.softmax(o, 1)[0, p.y_train[i]]
            else:
                w = 2 * (o.flatten()[0] - p.y_train[i]) * 2 * (ot.flatten()[0] - p.y_test[a])
            out[a, b] = float(phi_t[a] @ Kinv @ phi_j[b]) * float(w)
    return out


@pytest.mark.parametrize("proj_dim,damping,task", [(None, 0.0, "classification"), (256, 0.0, "classification"),
                                                   (40, 0.0, "classification"), (300, 0.1, "regression")])
def test_trak_equals_explicit_reference(proj_dim, damping, task):
    p = mlp_problem(task=task)
    s = TRAK(proj_dim=proj_dim, seed=3, damping=damping).scores(p)
    torch.testing.assert_close(s, ref_trak(p, proj_dim, 3, damping), rtol=1e-5, atol=1e-8)
    s2 = TRAK(proj_dim=proj_dim, seed=3, damping=damping, factored=False, max_train_rows_per_chunk=11).scores(p)
    torch.testing.assert_close(s2, s, rtol=1e-5, atol=1e-8)


def test_trak_projection_is_seeded_and_chunk_independent():
    layout = ParamLayout.of(mlp_problem().model)
    a = projection_matrix(layout, 300, 0)
    b = projection_matrix(layout, 300, 0, slice(128, 300))
    assert all(torch.equal(a[k][:, 128:], b[k]) for k in a)
    assert not torch.equal(projection_matrix(layout, 300, 1)[layout.names[0]], a[layout.names[0]])


# ------------------------------------------------------------------------------ Adam
def test_adam_second_moment_is_exact_over_all_batches():
    g = torch.randn(6, 4, dtype=torch.float64)
    for b in (1, 2, 3, 6):
        batches = [g[list(c)].mean(0).pow(2) for c in itertools.combinations(range(6), b)]
        torch.testing.assert_close(adam_second_moment(g.sum(0), g.pow(2).sum(0), 6, b), torch.stack(batches).mean(0))


@pytest.mark.parametrize("which", ["mlp", "cnn"])
def test_grad_dot_adam_equals_explicit_reference(which):
    p = mlp_problem() if which == "mlp" else cnn_problem()
    eps, bs = 1e-3, 8
    g_tr = ref_grads(p.model, p.x_train, p.y_train)
    n = len(g_tr)
    mean = g_tr.mean(0)
    v = mean ** 2 + g_tr.var(0, unbiased=True) / bs * (1 - bs / n)
    d = 1 / (v.sqrt() + eps)
    gt, gl = ref_grads(p.model, p.x_test, p.y_test), ref_grads(p.model, p.x_left_out, p.y_left_out)
    ref = torch.tensor([[float((gt[a] * d) @ gl[b]) for b in range(len(gl))] for a in range(len(gt))],
                       dtype=torch.float64)
    ours = GradDotAdam(eps=eps, batch_size=bs, max_train_rows_per_chunk=7).scores(p)
    torch.testing.assert_close(ours, ref, rtol=1e-8, atol=1e-10)
    huge = GradDotAdam(eps=1e6, batch_size=bs).scores(p) * 1e6  # ε ≫ √v: Grad-Dot
    torch.testing.assert_close(huge, GradDot().scores(p).double(), rtol=1e-4, atol=1e-10)


def test_grad_dot_adam_needs_eps():
    p = mlp_problem()
    with pytest.raises(ValueError, match="method.eps"):
        GradDotAdam(batch_size=8).scores(p)


# ------------------------------------------------------------------------------ orientation
@pytest.mark.parametrize("method", [GradDot(), GradCos(), DataInf(), TRAK(proj_dim=64),
                                    GradDotAdam(eps=1e-8, batch_size=8)])
def test_self_attribution_is_helpful(method):
    """A training instance attributed for itself as the test instance must be helpful
    (positive), the gold standard's sign: removing it raises its own loss."""
    p = mlp_problem()
    p.x_test, p.y_test = p.x_left_out, p.y_left_out
    p.test_indices = torch.arange(len(p.x_test))
    s = method.scores(p)
    assert s.shape == (6, 6)
    assert (torch.diagonal(s) > 0).all()


# ------------------------------------------------------------------------------ pipeline
def test_every_first_order_method_through_the_pipeline(tiny):
    run = train(compose_config("train", tiny))
    for m in (["method=datainf"], ["method=trak", "method.proj_dim=64"],
              ["method=grad_dot_adam", "further_optimizer=adam"]):
        cfg = compose_config("attribute", tiny + m)
        out = attribute(cfg)
        rec = load_json(out / "record.json")
        assert rec["seconds"] > 0 and "peak_mb" in rec
        s = load_tensors(out / "scores.safetensors")["scores"]
        assert s.shape == (6, 8) and torch.isfinite(s).all()
    adam = compose_config("attribute", tiny + ["method=grad_dot_adam", "further_optimizer=adam"])
    rec = load_json(run.method_dir(adam) / "record.json")
    assert rec["config"]["eps"] == 1e-8 and rec["config"]["batch_size"] == 16


# ------------------------------------------------------------------------------ peers (optional)
@pytest.mark.baselines
@pytest.mark.slow
def test_grad_dot_and_datainf_agree_with_dattri():
    pytest.importorskip("dattri")
    from dattri.algorithm.influence_function import IFAttributorDataInf
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.task import AttributionTask
    from torch.utils.data import DataLoader, TensorDataset

    p = mlp_problem()
    model = p.model.float()

    def xs(x, y):
        return DataLoader(TensorDataset(x.float(), y), batch_size=16, shuffle=False)

    def loss(params, data):
        xb, yb = data
        xb = xb.unsqueeze(0) if xb.dim() == 1 else xb
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, xb), yb.view(-1))

    task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    tr = TracInAttributor(task=task, weight_list=torch.ones(1), normalized_grad=False)
    tr.projector_kwargs = None  # dattri projects by default; exact Grad-Dot needs it off
    theirs = tr.attribute(xs(p.x_left_out, p.y_left_out), xs(p.x_test, p.y_test)).T
    ours = GradDot().scores(AttributionProblem(**{**p.__dict__, "model": model, "x_train": p.x_train.float(),
                                                  "x_test": p.x_test.float()}))
    assert cos(theirs.double(), ours.double()) > 0.999999
    torch.testing.assert_close(theirs, ours.float(), rtol=1e-4, atol=1e-6)

    att = IFAttributorDataInf(task=task, regularization=0.05)
    att.cache(xs(p.x_train, p.y_train))
    theirs = att.attribute(xs(p.x_left_out, p.y_left_out), xs(p.x_test, p.y_test)).T
    q = AttributionProblem(**{**p.__dict__, "model": model, "x_train": p.x_train.float(), "x_test": p.x_test.float()})
    ours = DataInf(damping=0.05, blocks="module").scores(q)
    assert cos(theirs.double(), ours.double()) > 0.9999


@pytest.mark.baselines
@pytest.mark.slow
def test_trak_agrees_with_traker_given_the_same_projection(tmp_path):
    pytest.importorskip("trak")
    from trak import TRAKer
    from trak.projectors import AbstractProjector, ProjectionType
    from trak.utils import vectorize

    p = mlp_problem(n=60)
    model = p.model.float()
    q = AttributionProblem(**{**p.__dict__, "model": model, "x_train": p.x_train.float(), "x_test": p.x_test.float()})
    layout, k = ParamLayout.of(model), 32
    blocks = projection_matrix(layout, k, 0)
    P = torch.cat([blocks[n] for n in layout.names])

    class Ours(AbstractProjector):
        def __init__(self):
            super().__init__(layout.n_params, k, 0, ProjectionType.normal, "cpu")

        def project(self, grads, model_id):
            return (vectorize(grads, device="cpu") if isinstance(grads, dict) else grads) @ P

    tr = TRAKer(model=model, task="image_classification", train_set_size=q.n_train, save_dir=str(tmp_path),
                device="cpu", projector=Ours(), proj_dim=k, use_half_precision=False)
    tr.load_checkpoint(model.state_dict(), model_id=0)
    tr.featurize(batch=(q.x_train, q.y_train), num_samples=q.n_train)
    tr.finalize_features()
    tr.start_scoring_checkpoint(exp_name="t", checkpoint=model.state_dict(), model_id=0, num_targets=len(q.x_test))
    tr.score(batch=(q.x_test, q.y_test), num_samples=len(q.x_test))
    theirs = torch.as_tensor(tr.finalize_scores(exp_name="t")).T[:, q.left_out_indices]
    ours = TRAK(proj_dim=k, seed=0).scores(q)
    assert cos(theirs.double(), ours) > 0.9999  # traker rescales K⁻¹ by its mean |entry|: compare directions
