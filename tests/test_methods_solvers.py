"""Solvers that refuse (tda.methods.lissa, cg, spectrum, checks). LiSSA / LiSSA-H on an operator
C + λI that is not positive definite refuse as CG and Arnoldi do (and leave positive definite problems'
numbers untouched); degenerate solver settings are refused when the method is built, with
one message naming the setting and a valid value; CG never writes the all-zero scores of a
solve that made no progress."""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.config import ROOT, TINY, compose_config
from helpers.methods import untrained_mlp_problem
from hydra.errors import InstantiationException

from tda.config import build
from tda.exits import DivergedError, RefusedError
from tda.methods.cg import CG
from tda.methods.curvature import CurvatureOperator
from tda.methods.damping import base_damping
from tda.methods.gradients import per_example_grads
from tda.methods.influence import scores_from_solution
from tda.methods.kfac import EKFAC, KFAC
from tda.methods.lissa import LiSSA, LiSSAH, iterate_bound, lissa_solve
from tda.methods.spectrum import definiteness_tolerance, lanczos_extremes, span_ritz_min
from tda.problem import AttributionProblem
from tda.stages import attribute, train

D = torch.float64


@pytest.fixture(scope="module")
def untrained():
    return untrained_mlp_problem()


def _damped(p: AttributionProblem, curvature: str, multiple: float):
    """(C + λI dense [P, P], λ) with λ = multiple × λ₀."""
    lam = multiple * base_damping(p.model, p.x_train, p.y_train, p.task)
    C = CurvatureOperator(p.model, p.x_train, p.y_train, p.task, curvature).dense()
    return C + lam * torch.eye(len(C), dtype=D), lam


# ------------------------------------------------------------------------------ LiSSA-H
@pytest.mark.parametrize("batch_size", [60, 16])  # the whole set (deterministic) and mini-batches
def test_lissa_h_refuses_indefinite_operator(untrained, batch_size):
    """H + λI with smallest eigenvalue −0.48: at scale 100 the recursion grows only by
    1.0048 per step, e^1.4 over 300 steps, far below the norm bound 10·s‖g‖/λ, so the
    recursion alone would return a result that solves nothing; the method refuses, naming the
    smallest eigenvalue (an upper bound of the true one, found by Lanczos), λ and the fix."""
    K, lam = _damped(untrained, "hessian", 1.0)
    true_min = float(torch.linalg.eigvalsh(K)[0])
    assert true_min < -0.4
    # what the old divergence test let through: the recursion itself does not notice
    p = untrained
    G = per_example_grads(p.model, p.x_test, p.y_test, p.task).T.contiguous()
    op = CurvatureOperator(p.model, p.x_train, p.y_train, p.task, "hessian")
    X = lissa_solve(op, G, lam, 100.0, 300, 1, batch_size, torch.Generator().manual_seed(0))
    print("relative residual of the unchecked recursion", float((K @ X - G).norm() / G.norm()))
    assert torch.isfinite(X).all() and (K @ X - G).norm() > G.norm()  # finite, and no solution at all

    m = LiSSAH(damping_multiple=1.0, depth=300, scale=100, batch_size=batch_size)
    with pytest.raises(ValueError) as err:
        m.scores(untrained)
    msg = str(err.value)
    found = m.record["spectrum"]["lanczos_min"]
    assert true_min - 1e-9 <= found <= 0.9 * true_min  # an upper bound, and close to the truth
    assert "lissa_h: C + λI is not positive definite (curvature=hessian, λ=0.0341" in msg
    assert f"smallest eigenvalue is ≤ {found:.3g}" in msg and "Lanczos" in msg
    assert "raise method.damping_multiple (now 1)" in msg and "method=lissa" in msg


def test_lissa_h_refuses_from_the_recursion_when_lanczos_misses(untrained):
    """One Lanczos step (a single Rayleigh quotient of a random vector, positive here) cannot
    see the negative eigenvalue; the smallest Ritz value of H + λI on the span of the
    recursion's last iterates and increments — power iterations that line up with the growing
    direction — proves it, and the method refuses instead of returning the slowly growing
    result."""
    K, _ = _damped(untrained, "hessian", 1.0)
    true_min = float(torch.linalg.eigvalsh(K)[0])
    m = LiSSAH(damping_multiple=1.0, depth=300, scale=100, batch_size=16, lanczos_steps=1)
    with pytest.raises(ValueError, match=r"span of the recursion's last iterates and increments at scale 100\), "
                                         r"so the LiSSA recursion grows"):
        m.scores(untrained)
    spec = m.record["spectrum"]
    assert spec["lanczos_min"] > 0 and true_min - 1e-9 <= spec["recursion_ritz_min"] < 0.5 * true_min


def test_lissa_without_damping_still_bounds_the_iterates(untrained):
    """With λ = 0 the bound s‖g‖/λ is infinite; a contracting recursion still adds at most ‖g‖ per
    step, so ‖h_t‖ ≤ (t + 1)‖g‖. A scale far below the curvature's largest eigenvalue makes the
    iterates grow geometrically while staying finite (here past 1e30 within 40 steps): refused as
    diverged, where only non-finite iterates were caught before."""
    p = untrained
    G = per_example_grads(p.model, p.x_test, p.y_test, p.task).T.contiguous()
    op = CurvatureOperator(p.model, p.x_train, p.y_train, p.task, "gn")
    top = float(torch.linalg.eigvalsh(op.dense())[-1])
    scale, depth = top / 100, 40  # |1 − μ_max/s| = 99 per step
    h = G.clone()
    for _ in range(depth):  # the plain recursion, unchecked: finite and huge
        h = G + h - op.matvec(h) / scale
    assert torch.isfinite(h).all() and float(h.norm() / G.norm()) > 1e30
    with pytest.raises(DivergedError, match=f"scale {scale}: .* diverged at step 10 of repeat 0"):
        lissa_solve(op, G, 0.0, scale, depth, 1, p.n_train, torch.Generator().manual_seed(0))
    # where s/λ is below depth + 1 the bound is s‖g‖/λ as before
    assert iterate_bound(0.5, 100.0, 5000) == 200.0 and iterate_bound(0.0, 100.0, 5000) == 5001.0
    assert iterate_bound(1e-9, 100.0, 5000) == 5001.0


@pytest.mark.parametrize("cls", [EKFAC, KFAC])
@pytest.mark.parametrize("dtype", [None, "float64"])  # the factored path and the dense one
def test_kfac_without_damping_on_a_singular_factor_is_refused(untrained, cls, dtype):
    """An input feature that is always 0 gives the first layer's input factor A a zero
    eigenvalue; without damping (G̃ + λI)⁻¹ divides by it (the scores were all NaN/inf and ended
    in a traceback at write). Refused naming the smallest eigenvalue and the damping that fixes
    it; with that damping the scores are finite."""
    p = dataclasses.replace(untrained, x_train=untrained.x_train.clone(), x_test=untrained.x_test.clone())
    p.x_train[:, 2] = 0.0
    p.x_test[:, 2] = 0.0
    with pytest.raises(RefusedError, match=rf"{cls.kind}: G̃ \+ λI is not positive definite \(λ=0 = 0·λ₀\): "
                                           r"its smallest eigenvalue is .* raise method.damping_multiple \(now 0\)"):
        cls(damping_multiple=0.0, dtype=dtype).scores(p)
    assert torch.isfinite(cls(damping_multiple=1.0, dtype=dtype).scores(p)).all()


@pytest.mark.parametrize("cls,curvature,multiple", [(LiSSA, "gn", 1.0), (LiSSAH, "hessian", 40.0)])
def test_lissa_on_positive_definite_operator_is_unchanged(untrained, cls, curvature, multiple):
    """C + λI positive definite (Gauss–Newton at 1·λ₀; the Hessian at 40·λ₀): the checks add
    records, not changes — the scores are bit for bit those of the bare recursion, and they
    match the exact dense solve within the recursion's own truncation bound
    (1 − μ_min/s)^depth, as in tests/test_methods_influence.py (the full-data residual
    (I − K/s)^(depth+1) g obeys the same bound)."""
    p = untrained
    K, lam = _damped(p, curvature, multiple)
    mu = torch.linalg.eigvalsh(K)
    assert float(mu[0]) > 0
    scale, depth = 2.0, 600
    m = cls(damping_multiple=multiple, depth=depth, scale=scale, batch_size=p.n_train)
    s = m.scores(p)

    # the bare recursion on the method's own inputs (gradients, λ, operator)
    bare = cls(damping_multiple=multiple)
    model, dtype, g_test, g_lo, lam = bare._prepare(p)
    op = bare._curvature_operator(p, model, dtype)
    X = lissa_solve(op, g_test.T.contiguous(), lam, scale, depth, 1, p.n_train, torch.Generator().manual_seed(0))
    assert torch.equal(s, scores_from_solution(X, g_lo, p.n_train, False).to(D))

    ref = g_test @ torch.linalg.solve(K, g_lo.T) / p.n_train
    bound = max(float((1 - mu[0] / scale) ** depth), 1e-12)  # 1e-12: float64 rounding
    assert bound < 1e-3 and float((s - ref).norm() / ref.norm()) < bound
    spec = m.record["spectrum"]
    assert float(mu[0]) - 1e-9 <= spec["lanczos_min"] < float(mu[0]) + 0.05
    assert spec["recursion_ritz_min"] >= float(mu[0]) - 1e-9 and spec["relative_residual_max"] < bound


def test_lanczos_bounds_the_spectrum_and_is_exact_on_the_whole_space():
    """Ritz values lie inside the spectrum (the smallest is an upper bound of λ_min); with as
    many steps as dimensions they are the extreme eigenvalues."""
    g = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=D))
    ev = torch.cat([torch.tensor([-0.3], dtype=D), torch.linspace(0.01, 5.0, 39, dtype=D)])
    A = Q @ torch.diag(ev) @ Q.T
    for steps in (3, 8):
        r = lanczos_extremes(lambda v: A @ v, 40, steps, torch.Generator().manual_seed(0), D)
        assert -0.3 - 1e-12 <= r["min"] and r["max"] <= 5.0 + 1e-12 and r["steps"] == steps
    r = lanczos_extremes(lambda v: A @ v, 40, 60, torch.Generator().manual_seed(0), D)
    assert r["min"] == pytest.approx(-0.3, abs=1e-10) and r["max"] == pytest.approx(5.0, abs=1e-10)


def test_span_ritz_value_is_no_false_alarm_in_float32():
    """Nearly parallel float32 vectors (an iterate and its tiny increments, as at the end of a
    converged recursion) on a positive definite operator with condition number 1e3: the
    smallest Ritz value stays within the float32 tolerance of the true one, never ≤ 0; on the
    whole space it is the smallest eigenvalue."""
    g = torch.Generator().manual_seed(2)
    Q, _ = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=D))
    ev = torch.logspace(-3, 0, 300, dtype=D)
    A32 = (Q @ torch.diag(ev) @ Q.T).float()
    h = torch.randn(300, 8, generator=g)
    W = torch.cat([h, h + 1e-5 * torch.randn(300, 8, generator=g)], dim=1)  # [300, 16], float32
    found = span_ritz_min(W, lambda V: A32 @ V)
    tol = definiteness_tolerance(1.0, torch.float32)
    assert found > 1e-3 - tol and found > tol
    assert span_ritz_min(torch.eye(300), lambda V: A32 @ V) == pytest.approx(1e-3, abs=tol)
    assert span_ritz_min(torch.zeros(300, 2), lambda V: A32 @ V) == float("inf")


# ------------------------------------------------------------------------------ CG
def test_cg_refuses_a_solve_that_made_no_progress(untrained, caplog):
    """A test instance whose gradient is not finite used to be 'solved' by x = 0 and written
    as a row of zero scores; it is refused. A solve stopped by maxiter that did make progress
    keeps its scores (not zero, finite) with the warning."""
    p = untrained
    x_test = p.x_test.clone()
    x_test[1, 2] = float("nan")
    bad = dataclasses.replace(p, x_test=x_test)
    with pytest.raises(ValueError, match=r"cg: 1 of 3 solves made no progress in method.maxiter=50 iterations"):
        CG(damping_multiple=1.0, maxiter=50).scores(bad)

    with caplog.at_level(logging.WARNING, logger="tda.methods.cg"):
        m = CG(damping_multiple=1.0, maxiter=1)
        s = m.scores(p)
    assert "did not reach tol" in caplog.text and m.record["cg"]["no_progress"] == 0
    assert torch.isfinite(s).all() and (s.abs().sum(1) > 0).all()


# ------------------------------------------------------------------------------ degenerate settings
DEGENERATE = [
    ("cg", "method.maxiter=0", "method.maxiter=0 must be a positive number of iterations; e.g. method.maxiter=100"),
    ("cg", "method.maxiter=-3", "method.maxiter=-3 must be a positive number of iterations; e.g. method.maxiter=100"),
    ("cg", "method.tol=-1e-6", "method.tol=-1e-06 must be a number ≥ 0"),
    ("cg", "method.batch_size=0", "method.batch_size=0 must be a positive number of training rows"),
    ("cg", "method.damping_multiple=-1", "method.damping_multiple=-1 must be a number ≥ 0"),
    ("cg", "method.curvature=hess", "method.curvature='hess' is not one of gn, hessian; e.g. method.curvature=gn"),
    ("if_corrected", "method.maxiter=0", "method.maxiter=0 must be a positive number of iterations"),
    ("lissa", "method.depth=0", "method.depth=0 must be a positive number of recursion steps; e.g. method.depth=5000"),
    ("lissa", "method.repeat=0", "method.repeat=0 must be a positive number of recursion runs"),
    ("lissa", "method.scale=0", "method.scale=0 must be a positive number"),
    ("lissa", "method.scale=-10", "method.scale=-10 must be a positive number"),
    ("lissa", "method.scales=[10,0,50]", "method.scales=[10, 0, 50] contains 0; every scale must be a positive"),
    ("lissa", "method.scales=[]", "method.scales=[] must be a non-empty list of positive scales"),
    ("lissa", "method.batch_size=0", "method.batch_size=0 must be a positive number of training rows"),
    ("lissa", "method.divergence_factor=0", "method.divergence_factor=0 must be a positive number"),
    ("lissa_h", "method.damping_multiple=-0.5", "method.damping_multiple=-0.5 must be a number ≥ 0"),
    ("arnoldi", "method.top_k=0", "method.top_k=0 must be a positive number of eigenpairs to keep"),
    ("arnoldi", "method.n_iters=0", "method.n_iters=0 must be a positive number of Arnoldi steps"),
    ("arnoldi", "method.top_k=300", "method.top_k=300 exceeds method.n_iters=200"),
    ("ekfac", "method.batch_size=0", "method.batch_size=0 must be a positive number of training rows"),
    ("kfac", "method.damping_multiple=-1", "method.damping_multiple=-1 must be a number ≥ 0"),
    ("datainf", "method.chunk_size=0", "method.chunk_size=0 must be a positive number of rows"),
    ("trak", "method.max_train_rows_per_chunk=0", "method.max_train_rows_per_chunk=0 must be a positive number"),
    ("grad_dot", "method.chunk_size=-1", "method.chunk_size=-1 must be a positive number of rows"),
    ("grad_dot_adam", "method.eps=-1e-8", "method.eps=-1e-08 must be positive"),
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny final model shared by the cases below (each refuses before any work)."""
    runs = tmp_path_factory.mktemp("solver_runs") / "runs"
    old = os.environ.get("TDA_RUNS_DIR")
    os.environ["TDA_RUNS_DIR"] = str(runs)
    try:
        train(compose_config("train", TINY))
    finally:
        if old is None:
            os.environ.pop("TDA_RUNS_DIR")
        else:
            os.environ["TDA_RUNS_DIR"] = old
    return runs


def _cause(err: BaseException) -> str:
    """The message a user reads: Hydra's instantiate wraps the constructor's ValueError."""
    return str(err.__cause__ if isinstance(err, InstantiationException) and err.__cause__ else err)


@pytest.mark.parametrize("method,override,message", DEGENERATE, ids=[f"{m}:{o}" for m, o, _ in DEGENERATE])
def test_degenerate_setting_is_refused_before_any_work(tiny_run, monkeypatch, method, override, message):
    monkeypatch.setenv("TDA_RUNS_DIR", str(tiny_run))
    cfg = compose_config("attribute", TINY + [f"method={method}", override])
    with pytest.raises((ValueError, InstantiationException)) as err:
        attribute(cfg)
    _assert_refused(message, _cause(err.value))
    assert not list(tiny_run.glob("*/methods/*/scores*")), "nothing may be written"
    with pytest.raises((ValueError, InstantiationException)) as err:
        build(cfg.method)  # the constructor itself, as attribute() builds the method first
    _assert_refused(message, _cause(err.value))


def _assert_refused(message: str, refused: str) -> None:
    """The constructor's own message, or the range check's that comes first for a numeric
    argument (tda.ranges): the setting as given and the values it may take."""
    setting = message.split(" ")[0]
    assert message in refused or (setting in refused and " must " in refused), refused


def test_arnoldi_top_k_above_the_parameter_count_is_refused(tiny_run, monkeypatch):
    """Checked at run time (the count is the model's): before any gradient is computed."""
    monkeypatch.setenv("TDA_RUNS_DIR", str(tiny_run))
    cfg = compose_config("attribute", TINY + ["method=arnoldi", "method.n_iters=30000", "method.top_k=25000"])
    with pytest.raises(ValueError, match=r"method.top_k=25000 exceeds the 20738 trainable parameters of the model, "
                                         r"the most eigenpairs its curvature has; e.g. method.top_k=100"):
        attribute(cfg)


def test_cg_maxiter_zero_from_the_command_line_exits_non_zero(tiny_run):
    """`python attribute.py method=cg method.maxiter=0`: the message, a non-zero exit status,
    no scores written."""
    env = {**os.environ, "TDA_RUNS_DIR": str(tiny_run), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(Path(ROOT) / "attribute.py"), *TINY, "method=cg", "method.maxiter=0"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    message = "method.maxiter=0 must be in [1, 2147483647] (iterations"
    assert message in out.stderr + out.stdout
    assert not list(tiny_run.glob("*/methods/cg-*/scores*"))
