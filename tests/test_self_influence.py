"""Self-influence τ(z_i, z_i) of every method (tda.methods.self_influence, Method.self_influence):

- every method's self-influence is the diagonal of its own pairwise scores with the whole training
  set as test and left-out instances, however the training rows are blocked (the default) and
  through each method's shortcut (Grad-Dot's ‖g‖², TRAK's features computed once);
- Grad-Dot's and CG's equal a dense computation written here (one autograd call per instance, an
  explicit Gauss–Newton matrix and torch.linalg.solve) to float32 rounding;
- Grad-Cos refuses (its self-score is 1 for everyone); the loss baseline is the per-example loss;
- the gold standard's self-effect (tda.further_training.self_effect) is the diagonal of the derivative
  gold standard with the training set as test set, in forward and reverse mode and in blocks, and
  the first-order removal effect of reference.py's `mask` runs.
"""

from __future__ import annotations

import pytest
import torch
from helpers.config import compose_config
from helpers.further_training import toy_problem
from torch import nn
from torch.func import functional_call

from tda.artifacts import load_tensors, load_tensors_with_metadata
from tda.config import ConfigError, build
from tda.exits import RefusedError
from tda.further_training.derivative import WeightedTrajectory
from tda.further_training.optim import optimizer_spec
from tda.further_training.reference import further_train_run
from tda.further_training.self_effect import SelfEffect, self_effect_seed
from tda.further_training.settings import FurtherTrainingSettings
from tda.further_training.store import GoldStandardSpec
from tda.methods.grad_dot import GradCos, GradDot
from tda.methods.layout import ParamLayout, trainable_params
from tda.methods.self_influence import block_problem, block_rows, diagonal_of_scores
from tda.methods.training_loss import TrainingLoss
from tda.models.base import per_example_loss
from tda.models.mlp import MLP
from tda.problem import AttributionProblem
from tda.provenance import ProvenanceError

N = 40


def _problem(dtype=torch.float32, n=N, budget=2048.0) -> AttributionProblem:
    """A 5-8-6-3 ReLU MLP briefly fitted to 3-class data (near, not at, a minimum), `n` training rows."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n + 5, 5, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] ** 2 > 0.5).long() + (x[:, 2] > 0.8).long()
    torch.manual_seed(0)
    model = MLP([5], 3, hidden=(8, 6))
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(60):
        opt.zero_grad()
        per_example_loss(model(x[:n]), y[:n], "classification").mean().backward()
        opt.step()
    model = model.to(dtype).eval()
    x = x.to(dtype)
    return AttributionProblem(model=model, task="classification", x_train=x[:n], y_train=y[:n], x_test=x[n:],
                              y_test=y[n:], left_out_indices=torch.arange(0, n, 4), test_indices=torch.arange(5),
                              memory_budget_mb=budget)


# every method config, with settings that keep it small; LiSSA at a fixed scale (`auto` may pick
# another scale for another block of columns) and with a damping that keeps the Hessian definite
METHODS = {
    "grad_dot": [], "datainf": [], "trak": ["method.proj_dim=64"], "cg": ["method.dtype=float64", "method.tol=1e-10"],
    "lissa": ["method.depth=60", "method.scale=50", "method.batch_size=16"],
    "lissa_h": ["method.depth=60", "method.scale=50", "method.damping_multiple=3000"],
    "arnoldi": ["method.n_iters=30", "method.top_k=20"], "kfac": [], "ekfac": [],
    "if_corrected": ["method.dtype=float64"],
    "grad_dot_adam": ["further_optimizer=adam"],
}


def _method(name: str):
    return build(compose_config("attribute", [f"method={name}", *METHODS[name]]).method)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_self_influence_is_the_diagonal_of_the_methods_own_scores(name):
    """τ(z_i, z_i) from `self_influence` (a method's shortcut or the blocked default) and from the
    blocked default with 7-row blocks equal the diagonal of one `scores` call with every training
    row as test and left-out instance."""
    problem = _problem()
    full = _method(name).scores(block_problem(problem, torch.arange(N))).diagonal().double()
    mine = _method(name).self_influence(problem)
    blocked = diagonal_of_scores(_method(name), problem, rows=7)
    assert mine.shape == blocked.shape == (N,) and mine.dtype == torch.float64
    scale = float(full.abs().max())
    assert float((blocked - full).abs().max()) <= 1e-5 * scale
    assert float((mine - full).abs().max()) <= 1e-5 * scale


def _grads_by_loop(problem: AttributionProblem) -> torch.Tensor:
    """[n, n_params]: one autograd call per training instance (no vmap, no factors)."""
    model, rows = problem.model, []
    for i in range(problem.n_train):
        loss = per_example_loss(model(problem.x_train[i:i + 1]), problem.y_train[i:i + 1], problem.task).sum()
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))]))
    return torch.stack(rows)


def test_grad_dot_self_influence_is_the_squared_gradient_norm():
    """‖g_i‖² against one autograd call per instance: to float64 rounding on a float64 model; on
    the float32 model to float32 rounding of the largest entry (a well-fitted instance's gradient,
    softmax − one-hot, loses its relative precision to cancellation in float32)."""
    exact = _problem(torch.float64)
    assert torch.allclose(GradDot().self_influence(exact), _grads_by_loop(exact).pow(2).sum(1), rtol=1e-10, atol=0)
    problem = _problem()
    expected = _grads_by_loop(problem).double().pow(2).sum(1)
    assert float((GradDot().self_influence(problem) - expected).abs().max()) <= 1e-5 * float(expected.max())
    with pytest.raises(RefusedError, match=r"grad_cos has no self-influence to rank by: the cosine of a gradient "
                                           r"with itself is 1 for every training instance.*method=grad_dot"):
        GradCos().self_influence(problem)


def _dense_gauss_newton(problem: AttributionProblem) -> torch.Tensor:
    """G = 1/n Σ_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i [n_params, n_params], float64, by plain autograd."""
    model = problem.model.double()
    layout = ParamLayout.of(model)
    theta = layout.flatten(trainable_params(model))
    x = problem.x_train.double()

    def logits(flat):
        return functional_call(model, layout.unflatten(flat), (x,))

    J = torch.autograd.functional.jacobian(logits, theta, vectorize=True)  # [n, C, P]
    p = logits(theta).softmax(-1)
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    problem.model.to(problem.x_train.dtype)
    return torch.einsum("ncp,ncd,ndq->pq", J, lam, J) / len(x)


def _close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, rtol32: float = 1e-4) -> bool:
    """Entry by entry to float64 rounding on a float64 model; on a float32 model to float32
    rounding of the largest entry (a well-fitted instance's gradient, softmax − one-hot, loses its
    relative precision to cancellation in float32, so a tiny entry is only good in absolute terms)."""
    if dtype == torch.float64:
        return torch.allclose(got, expected, rtol=1e-8, atol=0)
    return float((got - expected).abs().max()) <= rtol32 * float(expected.abs().max())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cg_self_influence_equals_a_dense_solve(dtype):
    """g_iᵀ(G + λI)⁻¹g_i / n with G formed explicitly and λ = 100 × the mean squared gradient
    entry, against CG's self-influence, whether CG solves in float64 or, at its default tolerance,
    in float32."""
    problem = _problem(dtype)
    G = _grads_by_loop(problem).double()
    lam = 100 * float(G.pow(2).mean())
    C = _dense_gauss_newton(problem)
    dense = (G * torch.linalg.solve(C + lam * torch.eye(len(C), dtype=torch.float64), G.T).T).sum(1) / N
    precise = build(compose_config("attribute", ["method=cg", "method.dtype=float64", "method.tol=1e-12"]).method)
    assert _close(precise.self_influence(problem), dense, dtype)
    default = build(compose_config("attribute", ["method=cg"]).method)
    assert float((default.self_influence(problem) - dense).abs().max()) <= 1e-4 * float(dense.max())


def test_blocks_fit_the_memory_budget_and_change_nothing():
    """A budget of a few KB per block: blocks of 1..3 rows, the same numbers (float64 model)."""
    problem, small = _problem(torch.float64), _problem(torch.float64, budget=0.05)
    assert block_rows(small) < 4 < block_rows(problem) == N
    cg = ["method=cg", "method.dtype=float64", "method.tol=1e-12"]
    a = build(compose_config("attribute", cg).method).self_influence(problem)
    method = build(compose_config("attribute", cg).method)
    b = method.self_influence(small)
    assert torch.allclose(a, b, rtol=1e-9, atol=0)
    assert len(method.record["blocks"]) == -(-N // block_rows(small))


def test_loss_baseline_is_the_per_example_loss_and_scores_no_pairs():
    problem = _problem()
    with torch.no_grad():
        expected = nn.functional.cross_entropy(problem.model(problem.x_train), problem.y_train, reduction="none")
    assert torch.allclose(TrainingLoss(batch_size=7).self_influence(problem), expected.double(), rtol=1e-6)
    with pytest.raises(RefusedError, match=r"method=loss is the baseline of self-influence .* run it with "
                                           r"attribution.target=self"):
        TrainingLoss().scores(problem)


# ------------------------------------------------------------------ the gold standard's self-effect
F64 = torch.float64
SGD = {"_target_": "torch.optim.SGD", "lr": 0.01, "momentum": 0.9}


def _gold_problem(n=24):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=g, dtype=F64)
    y = torch.randint(0, 3, (n,), generator=g)
    torch.manual_seed(0)
    return MLP([6], 3, hidden=(7, 5)).to(F64), x, y


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_gold_self_effect_is_the_diagonal_of_the_derivative_gold_standard(mode):
    """Blocks of the training set as test set (a budget that fits a few rows), either mode: the
    diagonal of one reverse-mode derivative [T, n, n] with the whole training set as test set."""
    model, x, y = _gold_problem()
    ft = FurtherTrainingSettings(epochs=2, batch_size=8, removal="mask", estimator="derivative")
    whole = WeightedTrajectory(model, optimizer_spec(SGD), x, y, x, y, "classification", ft, 3).reverse_mode()
    expected = whole.derivative.diagonal(dim1=1, dim2=2)  # [T, n]
    budget = 8 * 2 * len(x) * 5 * 4 / 2**20  # [T, 5 rows, n] float64 in a quarter of the budget
    got = self_effect_seed(model, optimizer_spec(SGD), x, y, "classification", ft, 3, mode, torch.device("cpu"),
                           budget)
    assert got["self_effect"].shape == expected.shape == (2, len(x))
    assert float((got["self_effect"] - expected).abs().max()) <= 1e-10 * float(expected.abs().max())
    assert torch.allclose(got["full_loss"], whole.full_loss.double(), atol=1e-12)


def test_gold_self_effect_is_the_first_order_effect_of_removing_the_instance():
    """reference.py's `mask` runs without instance i, its own loss before minus after, against the
    self-effect at the last checkpoint: first order in the small learning rate, once the `mask`
    secant's |B| / (|B| − 1) = 8/7 is applied (docs/further_training.md, the derivative's table)."""
    model, x, y = _gold_problem()
    sgd = {"_target_": "torch.optim.SGD", "lr": 1e-3}
    ft = FurtherTrainingSettings(epochs=2, batch_size=8, removal="mask", estimator="derivative")
    effect = self_effect_seed(model, optimizer_spec(sgd), x, y, "classification", ft, 3, "forward",
                              torch.device("cpu"), 64.0)["self_effect"][-1]
    opt = lambda params: torch.optim.SGD(params, lr=1e-3)  # noqa: E731 - reference.py's optimizer factory
    for i in (0, 5, 17):
        full = further_train_run(model, opt, x, y, x[i:i + 1], y[i:i + 1], "classification", 2, 3, 8, None, "mask")
        without = further_train_run(model, opt, x, y, x[i:i + 1], y[i:i + 1], "classification", 2, 3, 8, i, "mask")
        difference = float(without[-1, 0] - full[-1, 0])
        assert difference > 0 and float(effect[i]) * 8 / 7 == pytest.approx(difference, rel=1e-2)


def test_gold_self_effect_needs_the_derivative_estimator():
    cfg = compose_config("attribute", ["method=further_training", "attribution.target=self"])
    with pytest.raises(ConfigError, match=r"computed by the derivative estimator .* not "
                                          r"further_training.estimator=difference; set "
                                          r"further_training.estimator=derivative"):
        SelfEffect(GoldStandardSpec.from_config(cfg))


def test_gold_self_effect_job_writes_resumes_and_refuses_another_gold_standards_seeds(tmp_path):
    """The job writes one file per seed and their mean at the last checkpoint as the scores the
    evaluation reads; a re-run recomputes nothing; a seed file of other settings (another
    learning rate) in the directory is refused, not reused or overwritten."""
    overrides = ["further_training.estimator=derivative", "further_training.removal=mask", "attribution.target=self"]
    cfg, problem = toy_problem(overrides)
    out = SelfEffect(GoldStandardSpec.from_config(cfg)).run(problem, tmp_path / "gold")
    seeds = [load_tensors_with_metadata(out / f"seed_{s:05d}.safetensors")[0]["self_effect"] for s in range(3)]
    scores = load_tensors(out / "scores.safetensors")["scores"]
    assert scores.shape == (30,) and torch.allclose(scores, torch.stack([s[-1] for s in seeds]).mean(0), atol=1e-15)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    SelfEffect(GoldStandardSpec.from_config(cfg)).run(problem, out)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    other, _ = toy_problem(overrides + ["further_optimizer.lr=0.5"])
    (out / "scores.safetensors").unlink()
    with pytest.raises(ProvenanceError, match=r"(?s)refusing to combine the self-effect file .*seed_00000.safetensors"
                                              r".*lr: artifact has 0.0001, this run needs 0.5.*Delete"):
        SelfEffect(GoldStandardSpec.from_config(other)).run(problem, out)
