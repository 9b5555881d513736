"""The influence methods' per-model cache (tda.methods.cache): λ₀, the (E)K-FAC factors and
LiSSA's Lanczos spectrum are computed once per model and data, reused across a damping sweep
with the same numbers as a fresh computation, and refused (recomputed, with a warning) when an
entry is damaged or was computed from another model or data set. Also the fast paths the
checks take: Lanczos on C shifted by λ against Lanczos on C + λI and the dense spectrum, and
the residual's products taken from the span check's against direct products."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from helpers.methods import untrained_mlp_problem
from torch import nn

from tda.artifacts import load_json, save_json
from tda.methods.cache import CurvatureCache
from tda.methods.curvature import CurvatureOperator
from tda.methods.damping import base_damping
from tda.methods.gradients import per_example_grads
from tda.methods.lissa import LiSSA, LiSSAH
from tda.methods.spectrum import lanczos_extremes, span_ritz
from tda.problem import AttributionProblem

D = torch.float64


@pytest.fixture(scope="module")
def problem():
    return untrained_mlp_problem()


def _with_cache(p: AttributionProblem, path) -> AttributionProblem:
    return AttributionProblem(**{**p.__dict__, "cache_dir": path})


def test_lambda0_entry_records_its_source_and_is_refused_when_foreign(problem, tmp_path, caplog):
    p = problem
    lam0 = base_damping(p.model, p.x_train, p.y_train, p.task, cache_dir=tmp_path)
    (path,) = tmp_path.glob("lambda0-*.json")
    entry = load_json(path)
    cache = CurvatureCache(tmp_path, p.model, p.x_train, p.y_train)
    assert entry["source"] == cache.source and entry["settings"] == {"task": "classification"}
    assert entry["value"]["lambda0"] == lam0
    g = per_example_grads(p.model, p.x_train, p.y_train, p.task)
    assert lam0 == pytest.approx(float(g.pow(2).mean()), rel=1e-12)

    # an entry at this name that says it was computed from other data: recomputed, with a warning
    save_json(path, {**{k: v for k, v in entry.items() if k != "_sha256"},
                     "source": {**entry["source"], "data": "0" * 64}, "value": {"lambda0": 123.0, "n_rows": 60}})
    with caplog.at_level(logging.WARNING, logger="tda.methods.cache"):
        assert base_damping(p.model, p.x_train, p.y_train, p.task, cache_dir=tmp_path) == lam0
    assert "data:" in caplog.text and "recomputing it" in caplog.text
    assert load_json(path)["value"]["lambda0"] == lam0  # replaced

    # a damaged entry: recomputed
    path.write_text(path.read_text().replace(json.dumps(lam0), json.dumps(lam0 * 2)))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tda.methods.cache"):
        assert base_damping(p.model, p.x_train, p.y_train, p.task, cache_dir=tmp_path) == lam0
    assert caplog.text

    # other weights or other data: another entry (the key is the content, not the name)
    other = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).to(D)
    other.load_state_dict(p.model.state_dict())
    with torch.no_grad():
        other[0].weight[0, 0] += 1e-3
    lam_other = base_damping(other, p.x_train, p.y_train, p.task, cache_dir=tmp_path)
    lam_rows = base_damping(p.model, p.x_train[:50], p.y_train[:50], p.task, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("lambda0-*.json"))) == 3 and lam_other != lam0 and lam_rows != lam0


def test_lanczos_on_c_shifted_by_lambda_is_lanczos_on_c_plus_lambda(problem):
    """The Krylov spaces of C and C + λI from one start are the same, so every Ritz value moves
    by λ: LiSSA's cached spectrum of C serves every damping. Checked against Lanczos on C + λI
    itself and against the dense spectrum (full Lanczos on all 123 dimensions is exact)."""
    p = problem
    op = CurvatureOperator(p.model, p.x_train, p.y_train, p.task, "hessian")
    for lam in (0.01, 0.5, 3.0):
        def K(V, lam=lam):
            return op.matvec(V).add_(V, alpha=lam)

        for steps in (5, 20):
            c = lanczos_extremes(op.matvec, op.n_params, steps, torch.Generator().manual_seed(0), D)
            k = lanczos_extremes(K, op.n_params, steps, torch.Generator().manual_seed(0), D)
            assert c["min"] + lam == pytest.approx(k["min"], abs=1e-10)
            assert c["max"] + lam == pytest.approx(k["max"], abs=1e-10)
    ev = torch.linalg.eigvalsh(op.dense())
    full = lanczos_extremes(op.matvec, op.n_params, 200, torch.Generator().manual_seed(0), D)
    assert full["min"] == pytest.approx(float(ev[0]), abs=1e-9)
    assert full["max"] == pytest.approx(float(ev[-1]), abs=1e-9)


def test_lissa_spectrum_is_cached_across_a_damping_sweep(problem, tmp_path):
    """A sweep over the multiple runs Lanczos once: the second run loads C's Ritz values and
    shifts them by its own λ, records the same numbers as a run without a cache, and still
    refuses the indefinite operator it refuses without one."""
    p = _with_cache(problem, tmp_path)
    fresh = LiSSAH(damping_multiple=40.0, depth=50, scale=2.0, batch_size=60)
    s_fresh = fresh.scores(problem)
    first = LiSSAH(damping_multiple=30.0, depth=50, scale=2.0, batch_size=60)
    first.scores(p)
    second = LiSSAH(damping_multiple=40.0, depth=50, scale=2.0, batch_size=60)
    s = second.scores(p)
    assert first.record["spectrum"]["lanczos_cached"] is False and second.record["spectrum"]["lanczos_cached"] is True
    assert len(list(tmp_path.glob("spectrum-*.json"))) == 1
    assert torch.equal(s, s_fresh)
    for key in ("lanczos_min", "lanczos_max", "tolerance"):
        assert second.record["spectrum"][key] == pytest.approx(fresh.record["spectrum"][key], rel=1e-12, abs=1e-15)
    assert second.record["spectrum"]["lanczos_min"] - second.record["damping"] == pytest.approx(
        first.record["spectrum"]["lanczos_min"] - first.record["damping"], abs=1e-12)
    with pytest.raises(ValueError, match="not positive definite"):
        LiSSAH(damping_multiple=1.0, depth=50, scale=2.0, batch_size=60).scores(p)
    # another curvature is another entry
    LiSSA(damping_multiple=1.0, depth=50, scale=2.0, batch_size=60).scores(p)
    assert len(list(tmp_path.glob("spectrum-*.json"))) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_span_products_equal_direct_products(dtype):
    """K W[:, :first] from the span check's products equals K applied to those columns, to the
    precision of a direct product — also when columns are dependent (a direction dropped from
    the basis is multiplied afresh) — and the smallest Ritz value is unchanged by asking."""
    g = torch.Generator().manual_seed(3)
    n = 400
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    A = (Q @ torch.diag(torch.logspace(-2, 1, n, dtype=D)) @ Q.T).to(dtype)
    h = torch.randn(n, 6, generator=g, dtype=D)
    h[:, 5] = h[:, 0] + 1e-9 * torch.randn(n, generator=g, dtype=D)  # nearly dependent on column 0
    W = torch.cat([h, h + 1e-4 * torch.randn(n, 6, generator=g, dtype=D)], dim=1).to(dtype)
    calls = []

    def matvec(V):
        calls.append(V.shape[1])
        return A @ V

    ritz, KW = span_ritz(W, matvec, first=6, columns=4)
    direct = (A @ W[:, :6]).double()
    eps = torch.finfo(dtype).eps
    rel = (KW - direct).norm(dim=0) / direct.norm(dim=0)
    assert float(rel.max()) < 100 * eps
    assert ritz == span_ritz(W, lambda V: A @ V, columns=4)[0]
    # the basis: 11 directions, in chunks of 4. Columns 0 and 5 differ by 1e-9 of their norm, a
    # direction dropped as dependent: in float64 that is above the operator's precision, so the
    # two are multiplied afresh; in float32 it is not
    assert calls == [4, 4, 3] + ([2] if dtype == torch.float64 else [])
