"""Benchmark of the influence-function methods (issue 5), in the rows of benchmarks/common.py.

    python -m benchmarks.methods_influence [--out rows.json] [--problems folktables_sized_3k,folktables_sized]
                                           [--cases cg,arnoldi,lissa_h,ekfac,kfac]

`benchmarks/methods.py` runs :func:`influence_cases` after its own cases; run this file alone
to measure only these (same subprocess isolation, same row format:
{method, problem, seconds, peak_mb, baseline, baseline_seconds, baseline_peak_mb, speedup,
agreement, note}).

Equal agreement: block CG and the one-at-a-time reference both run to the same relative
residual (CG_TOL) for every column, so the row compares the work each needs to get there (the
block's columns share their Krylov space and need fewer products; `note` gives both counts).
dattri (installed) is the peer for CG, Arnoldi and LiSSA, given the same absolute damping
λ = PEER_DAMPING and one training batch (dattri sums the inverse-curvature products of its
training batches, so one batch = the full-data IF); its CG has no stopping rule, so it runs the
iterations one-column CG needs for CG_TOL (DATTRI_CG_ITERS).
kronfluence is the peer for EK-FAC and K-FAC. It declares torchvision, a CUDA-built wheel on
PyPI that the project keeps out, but its library code never imports it, so the `baselines`
extra does not list it: install it with `pip install --no-deps kronfluence` after
`pip install -e ".[baselines]"` (which brings its other requirements).

Problems (built by benchmarks/common.py): `folktables_sized` (30,085 rows, MLP 791-128-128-2,
118,274 parameters, 100 test × 100 left-out) and `folktables_sized_3k` (its first 3,000 rows).
The full problem runs EK-FAC, K-FAC and block CG at the paper's damping; the damping sweep of
CG and the peer comparisons with dattri (whose products over 30,085 rows for 100 vmapped
columns would need tens of GB) run on the 3k problem. `resnet9_cifar` (ResNet-9 at width 0.25
on the 4,000 local CIFAR-10 training images, batch norm in eval mode) runs Arnoldi against
dattri's on its first CNN_ROWS images, block CG against one-at-a-time CG on its first
CNN_CG_ROWS (100 of them left out, so that both variants solve the test side), and EK-FAC /
K-FAC on all 4,000.

    python -m benchmarks.methods_influence --products

times the curvature products alone: the MLP's hand-written path against `torch.func`, one
column against a block of 100 (benchmarks/results/curvature_products.json).
"""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.common import Case, Result, arguments, load_problem, run
from benchmarks.peers import kronfluence_scores
from tda.methods.arnoldi import Arnoldi
from tda.methods.cg import CG
from tda.methods.curvature import CurvatureOperator
from tda.methods.damping import base_damping
from tda.methods.kfac import EKFAC, KFAC
from tda.methods.lissa import LiSSAH
from tda.models.base import per_example_loss
from tda.problem import AttributionProblem

MULTIPLE = 100.0  # the paper's reported damping, 100·λ₀ (Gauss–Newton cases)
# absolute λ for the true-Hessian comparisons with dattri
# (chosen on 300 rows, where λ = 0.1 leaves H + λI indefinite)
PEER_DAMPING = 0.5
CNN_PEER_DAMPING = 30.0  # ... on the ResNet-9 (its Hessian's most negative Ritz value is about −22)
N_ROWS = 3000  # training rows of the peer comparisons with dattri (see the module docstring)
CNN_ROWS = 256  # training images of the ResNet-9 Arnoldi case
CNN_CG_ROWS = 128  # ... and of its CG case (100 of them left out)
CG_TOL, CG_MAXITER, CG_BATCH = 1e-5, 500, 4096  # float32 models: 1e-5 is well above the round-off floor
CG_SWEEP = (10.0, 1.0, 0.1)  # further damping multiples, on the 3k problem
DATTRI_CG_ITERS = 5  # what one-column CG needs for CG_TOL on the 3k problem at λ = PEER_DAMPING (all 100 columns)
CNN_CG_TOL = 1e-4  # a column product over 128 images costs ~0.6 s: keeps the one-at-a-time reference ~7 min
ARNOLDI_ITERS, ARNOLDI_K = 30, 20
# LiSSA-H against dattri's LiSSA: 10 is the scale `auto` picks at PEER_DAMPING (dattri takes a fixed one)
LISSA_DEPTH, LISSA_BATCH, LISSA_SCALE = 100, 128, 10.0


def _slice(p: AttributionProblem, n_test: int | None = None, rows: int = N_ROWS) -> AttributionProblem:
    """The first `rows` training rows, up to 100 left-out among them, optionally the first n_test tests."""
    k = len(p.x_test) if n_test is None else n_test
    return AttributionProblem(**{**p.__dict__, "x_train": p.x_train[:rows], "y_train": p.y_train[:rows],
                                 "left_out_indices": torch.arange(0, rows, max(rows // 100, 1))[:100],
                                 "x_test": p.x_test[:k], "y_test": p.y_test[:k], "test_indices": p.test_indices[:k]})


def _multiple_for(p: AttributionProblem, lam: float) -> float:
    return lam / base_damping(p.model, p.x_train, p.y_train, p.task)


def _cg(block: bool, multiple: float = MULTIPLE, curvature: str = "gn", n_test: int | None = None,
        rows: int | None = None, tol: float = CG_TOL):
    """CG to tolerance `tol` (equal agreement: every column meets the same residual bound), at
    damping `multiple` × λ₀ (Gauss–Newton) or PEER_DAMPING (true Hessian); on the problem's
    first `rows` training rows (None: all of them, with the problem's own left-out set)."""
    def run(p: AttributionProblem):
        if rows is None:
            k = len(p.x_test) if n_test is None else n_test
            q = AttributionProblem(**{**p.__dict__, "x_test": p.x_test[:k], "y_test": p.y_test[:k],
                                      "test_indices": p.test_indices[:k]})
        else:
            q = _slice(p, n_test, rows)
        multiple_ = _multiple_for(q, PEER_DAMPING) if curvature == "hessian" else multiple
        m = CG(curvature=curvature, damping_multiple=multiple_, tol=tol, maxiter=CG_MAXITER, block=block,
               batch_size=min(CG_BATCH, len(q.x_train)))
        s = m.scores(q)
        info = m.record["cg"]
        work = (f"{'block' if block else 'one at a time'}: {info['max_iterations']} iterations at most, "
                f"{m.record['curvature_products']} column products, {info['converged']}/{info['n_columns']} "
                f"converged")
        if n_test is None:
            return Result(s, note=work)
        return Result(s, list(range(n_test)), len(p.x_test) / n_test,
                      f"{work}; on {n_test} of {len(p.x_test)} test instances, time extrapolated linearly")
    return run


def _cnn_cg(block: bool, n_test: int | None = None):
    return _cg(block, n_test=n_test, rows=CNN_CG_ROWS, tol=CNN_CG_TOL)


def _arnoldi_rows(rows: int, lam: float = PEER_DAMPING):
    def run(p: AttributionProblem):
        q = _slice(p, rows=rows)
        return Arnoldi(curvature="hessian", damping_multiple=_multiple_for(q, lam), n_iters=ARNOLDI_ITERS,
                       top_k=ARNOLDI_K, batch_size=rows).scores(q)
    return run


_arnoldi = _arnoldi_rows(N_ROWS)


def _lissa_h(p: AttributionProblem):
    q = _slice(p)
    return LiSSAH(damping_multiple=_multiple_for(q, PEER_DAMPING), depth=LISSA_DEPTH, batch_size=LISSA_BATCH,
                  scale=LISSA_SCALE).scores(q)


def _dattri_task(p: AttributionProblem):
    from dattri.task import AttributionTask

    model = p.model

    def loss(params, data):  # the mean loss of a batch: one batch = the curvature of the mean training loss
        xb, yb = data  # dattri's LiSSA casts every data tensor to float, the labels too
        return torch.nn.functional.cross_entropy(torch.func.functional_call(model, params, xb), yb.long())

    return AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())


def _loader(x, y, bs):
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=False)


def _dattri(kind: str, rows: int = N_ROWS, lam: float = PEER_DAMPING):
    def run(p: AttributionProblem):
        from dattri.algorithm import influence_function as inf

        q = _slice(p, rows=rows)
        task = _dattri_task(q)
        if kind == "cg":  # dattri's CG has no stopping rule: it runs max_iter steps per column
            att = inf.IFAttributorCG(task=task, max_iter=DATTRI_CG_ITERS, mode="rev-fwd", regularization=lam)
        elif kind == "lissa":  # h ← v + (1 − d)h − Hh/s returns (H + d·s I)⁻¹v: d = λ/s gives our λ
            att = inf.IFAttributorLiSSA(task=task, batch_size=LISSA_BATCH, recursion_depth=LISSA_DEPTH,
                                        damping=lam / LISSA_SCALE, scaling=LISSA_SCALE, mode="rev-rev")
        else:
            att = inf.IFAttributorArnoldi(task=task, proj_dim=ARNOLDI_K, max_iter=ARNOLDI_ITERS,
                                          regularization=lam)
        att.cache(_loader(q.x_train, q.y_train, len(q.x_train)))
        s = att.attribute(_loader(q.x_left_out, q.y_left_out, 100), _loader(q.x_test, q.y_test, 100)).T
        return s / q.n_train  # dattri omits the 1/n of g_testᵀ(H+λI)⁻¹g_j / n
    return run


def _kronfluence(strategy: str):
    """kronfluence's EK-FAC / K-FAC (`tests/helpers/peers.py`) at the same absolute damping λ = MULTIPLE × λ₀."""
    def run(p: AttributionProblem):
        torch.manual_seed(0)
        return kronfluence_scores(p, strategy, MULTIPLE * base_damping(p.model, p.x_train, p.y_train, p.task))
    return run


def influence_cases() -> list[Case]:
    """The influence functions' cases."""
    return [
        # block CG against the same solver one column at a time, both to tolerance CG_TOL: on the
        # full problem at the paper's damping, then the damping sweep on its first 3,000 rows
        Case(f"cg[gn, {MULTIPLE:g}·λ₀, tol {CG_TOL:g}, block of 100]", "folktables_sized", _cg(True),
             {"cg one test instance at a time": _cg(False, n_test=10)}),
        *[Case(f"cg[gn, {m:g}·λ₀, tol {CG_TOL:g}, block of 100]", "folktables_sized_3k", _cg(True, m),
               {"cg one test instance at a time": _cg(False, m, n_test=10)}) for m in CG_SWEEP],
        Case(f"cg[hessian λ={PEER_DAMPING}, tol {CG_TOL:g}]", "folktables_sized_3k", _cg(True, curvature="hessian"),
             {f"dattri IFAttributorCG ({DATTRI_CG_ITERS} it)": _dattri("cg")}),
        Case(f"arnoldi[hessian λ={PEER_DAMPING}, {ARNOLDI_ITERS} it, top {ARNOLDI_K}, {N_ROWS} rows]",
             "folktables_sized_3k", _arnoldi, {"dattri IFAttributorArnoldi": _dattri("arnoldi")}),
        Case("ekfac", "folktables_sized", lambda p: EKFAC(damping_multiple=MULTIPLE).scores(p),
             {"kronfluence EK-FAC (sampled Fisher)": _kronfluence("ekfac")}),
        Case("kfac", "folktables_sized", lambda p: KFAC(damping_multiple=MULTIPLE).scores(p),
             {"kronfluence K-FAC (sampled Fisher)": _kronfluence("kfac")}),
        # ResNet-9 on CIFAR-10 images: curvature products over CNN_ROWS training images
        Case(f"arnoldi[hessian λ={CNN_PEER_DAMPING:g}, {ARNOLDI_ITERS} it, top {ARNOLDI_K}, {CNN_ROWS} rows]",
             "resnet9_cifar", _arnoldi_rows(CNN_ROWS, CNN_PEER_DAMPING),
             {"dattri IFAttributorArnoldi": _dattri("arnoldi", CNN_ROWS, CNN_PEER_DAMPING)}),
        Case(f"cg[gn, {MULTIPLE:g}·λ₀, tol {CNN_CG_TOL:g}, block of 100, {CNN_CG_ROWS} rows]", "resnet9_cifar",
             _cnn_cg(True), {"cg one test instance at a time": _cnn_cg(False, 10)}),
        Case("ekfac[4,000 rows]", "resnet9_cifar", lambda p: EKFAC(damping_multiple=MULTIPLE).scores(p), {}),
        Case("kfac[4,000 rows]", "resnet9_cifar", lambda p: KFAC(damping_multiple=MULTIPLE).scores(p), {}),
        Case(f"lissa_h[λ={PEER_DAMPING}, depth {LISSA_DEPTH}, batch {LISSA_BATCH}, scale {LISSA_SCALE:g}, "
             f"{N_ROWS} rows]", "folktables_sized_3k", _lissa_h, {"dattri IFAttributorLiSSA": _dattri("lissa")}),
    ]


def curvature_products(cache: Path, rows: int = 3000, reps: int = 3, rounds: int = 3) -> dict:
    """Curvature products on the first `rows` rows of folktables_sized_3k, timed side by side
    (alternating, best of `rounds`), in ms per column for one column and for a block of 100:
    - `mlp_fast_path`: `CurvatureOperator` as built for the MLP (tda/methods/mlp_curvature.py);
    - `torch_func`: the generic path (`fast_path=False`): reverse over reverse for the Hessian,
      JVP then VJP for the Gauss–Newton, vmapped over the columns of a block;
    - `forward_over_reverse_vmap` (Hessian): `jvp` of `grad` under vmap, the operator's first form.
    Also the largest relative difference of each way from the fast path."""
    import time

    from torch.func import functional_call, grad, jvp, vmap

    p = load_problem("folktables_sized_3k", cache, 2048.0)
    x, y = p.x_train[:rows], p.y_train[:rows]
    out = {"rows": rows, "threads": torch.get_num_threads(), "dtype": str(next(p.model.parameters()).dtype)}
    for curvature in ("gn", "hessian"):
        fast = CurvatureOperator(p.model, x, y, p.task, curvature, rows)
        generic = CurvatureOperator(p.model, x, y, p.task, curvature, rows, fast_path=False)

        def loss_sum(params):
            return per_example_loss(functional_call(generic.model, (params, generic.const), (x,)), y, p.task).sum()

        def fwd_over_rev(V):
            tangents = vmap(generic.layout.unflatten, in_dims=1)(V)
            o = vmap(lambda t: jvp(grad(loss_sum), (generic.params,), (t,))[1])(tangents)
            return torch.cat([o[k].reshape(V.shape[1], -1) for k in generic.layout.names], dim=1).T / len(x)

        for k in (1, 100):
            V = torch.randn(fast.n_params, k, generator=torch.Generator().manual_seed(0))
            modes = {"mlp_fast_path": fast.matvec, "torch_func": generic.matvec}
            if curvature == "hessian":
                modes["forward_over_reverse_vmap"] = fwd_over_rev
            best = {name: float("inf") for name in modes}
            ref = fast.matvec(V)
            diff = {name: float((f(V) - ref).norm() / ref.norm()) for name, f in modes.items()}
            for _ in range(rounds):
                for name, f in modes.items():
                    t = time.perf_counter()
                    for _ in range(reps):
                        f(V)
                    best[name] = min(best[name], (time.perf_counter() - t) / reps / k * 1e3)
            out[f"{curvature}, {k} column{'s' if k > 1 else ''}"] = {
                "ms_per_column": {n: round(v, 3) for n, v in best.items()},
                "speedup_over_torch_func": round(best["torch_func"] / best["mlp_fast_path"], 2),
                "relative_difference": diff}
    return out


if __name__ == "__main__":
    ap = arguments(__doc__.split("\n\n")[0], "folktables_sized_3k,folktables_sized",
                   Path("/tmp/tda_bench_methods_influence"))
    ap.add_argument("--products", action="store_true",
                    help="only time the curvature products: MLP fast path vs torch.func, one column vs 100")
    a = ap.parse_args()
    if a.products:
        import json

        print(json.dumps(curvature_products(a.cache), indent=1))
        raise SystemExit
    run(influence_cases, __file__, a)
