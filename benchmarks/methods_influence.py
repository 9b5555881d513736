"""Benchmark of the influence-function methods (issue 5), in the rows of benchmarks/methods.py.

    python benchmarks/methods_influence.py [--out rows.json] [--problems folktables_sized_3k,folktables_sized]
                                           [--cases cg,arnoldi,ekfac,kfac,lissa]

`benchmarks/methods.py` imports `CASES` from here and runs them with its own cases; run this
file alone to measure only these (same subprocess isolation, same row format:
{method, problem, seconds, peak_mb, baseline, baseline_seconds, baseline_peak_mb, speedup,
agreement, note}).

Equal work, so equal agreement: block CG and the one-at-a-time reference run the same fixed
number of CG iterations (tol 0) per column, so every column follows the same arithmetic and
the comparison is pure throughput. dattri (installed) is the peer for CG, Arnoldi and LiSSA,
given the same absolute damping λ = multiple × λ₀ and one training batch (dattri sums the
inverse-curvature products of its training batches, so one batch = the full-data IF).
kronfluence is the peer for EK-FAC and K-FAC. It declares torchvision, a CUDA-built wheel on
PyPI that the project keeps out, but its library code never imports it, so the `baselines`
extra does not list it: install it with `pip install --no-deps kronfluence` after
`pip install -e ".[baselines]"` (which brings its other requirements).

Problems (built by benchmarks/methods.py): `folktables_sized` (30,085 rows, MLP 791-128-128-2,
118,274 parameters, 100 test × 100 left-out) and `folktables_sized_3k` (its first 3,000 rows).
The full problem runs the methods whose cost is a few passes over the data (EK-FAC, K-FAC);
iterative solvers (100 right-hand sides × tens of full-data curvature products, each
~1 TFLOP on this model) run on the 3k problem on a 2-core CPU. `resnet9_cifar` (ResNet-9 at
width 0.25 on the 4,000 local CIFAR-10 training images, batch norm in eval mode) runs Arnoldi
against dattri's on its first CNN_ROWS images, block CG against one-at-a-time CG on its first
CNN_CG_ROWS (100 of them left out, so that both variants solve the test side), and EK-FAC /
K-FAC on all 4,000.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from tda.methods.arnoldi import Arnoldi  # noqa: E402
from tda.methods.base import AttributionProblem  # noqa: E402
from tda.methods.cg import CG  # noqa: E402
from tda.methods.hessian import base_damping  # noqa: E402
from tda.methods.kfac import EKFAC, KFAC  # noqa: E402

MULTIPLE = 100.0  # the paper's reported damping, 100·λ₀ (Gauss–Newton cases)
PEER_DAMPING = 0.5  # absolute λ for the true-Hessian comparisons with dattri (λ = 0.1 leaves H + λI indefinite here)
CNN_PEER_DAMPING = 30.0  # ... on the ResNet-9 (its Hessian's most negative Ritz value is about −22)
N_ROWS = 300  # training rows of the iterative-solver problems (see the module docstring)
CNN_ROWS = 256  # training images of the ResNet-9 Arnoldi case
CNN_CG_ROWS = 128  # ... and of its CG case (100 columns × 10 products over these images; 100 of them left out)
CG_ITERS = 10
ARNOLDI_ITERS, ARNOLDI_K = 30, 20


def _methods():
    """benchmarks/methods.py as loaded: `__main__` in its child processes (whose isinstance
    checks must see the same `Result` class), else imported."""
    main = sys.modules.get("__main__")
    if main is not None and hasattr(main, "Result") and hasattr(main, "Case"):
        return main
    import methods  # noqa: PLC0415

    return methods


def _slice(p: AttributionProblem, n_test: int | None = None, rows: int = N_ROWS) -> AttributionProblem:
    """The first `rows` training rows, up to 100 left-out among them, optionally the first n_test tests."""
    k = len(p.x_test) if n_test is None else n_test
    return AttributionProblem(**{**p.__dict__, "x_train": p.x_train[:rows], "y_train": p.y_train[:rows],
                                 "left_out_indices": torch.arange(0, rows, max(rows // 100, 1))[:100],
                                 "x_test": p.x_test[:k], "y_test": p.y_test[:k], "test_indices": p.test_indices[:k]})


def _multiple_for(p: AttributionProblem, lam: float) -> float:
    return lam / base_damping(p.model, p.x_train, p.y_train, p.task)


def _cg(block: bool, curvature: str = "gn", n_test: int | None = None, rows: int = N_ROWS):
    def run(p: AttributionProblem):
        Result = _methods().Result  # noqa: N806

        q = _slice(p, n_test, rows)
        multiple = MULTIPLE if curvature == "gn" else _multiple_for(q, PEER_DAMPING)
        s = CG(curvature=curvature, damping_multiple=multiple, tol=0.0, maxiter=CG_ITERS, block=block,
               batch_size=rows).scores(q)
        if n_test is None:
            return s
        return Result(s, list(range(n_test)), len(p.x_test) / n_test,
                      f"one at a time on {n_test} of {len(p.x_test)} test instances, time extrapolated linearly")
    return run


def _arnoldi_rows(rows: int, lam: float = PEER_DAMPING):
    def run(p: AttributionProblem):
        q = _slice(p, rows=rows)
        return Arnoldi(curvature="hessian", damping_multiple=_multiple_for(q, lam), n_iters=ARNOLDI_ITERS,
                       top_k=ARNOLDI_K, batch_size=rows).scores(q)
    return run


_arnoldi = _arnoldi_rows(N_ROWS)


def _dattri_task(p: AttributionProblem):
    from dattri.task import AttributionTask

    model = p.model

    def loss(params, data):  # the mean loss of a batch: one batch = the curvature of the mean training loss
        xb, yb = data
        return torch.nn.functional.cross_entropy(torch.func.functional_call(model, params, xb), yb)

    return AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())


def _loader(x, y, bs):
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=False)


def _dattri(kind: str, rows: int = N_ROWS, lam: float = PEER_DAMPING):
    def run(p: AttributionProblem):
        from dattri.algorithm import influence_function as inf

        q = _slice(p, rows=rows)
        task = _dattri_task(q)
        if kind == "cg":
            att = inf.IFAttributorCG(task=task, max_iter=CG_ITERS, tol=0.0, mode="rev-fwd",
                                     regularization=lam)
        else:
            att = inf.IFAttributorArnoldi(task=task, proj_dim=ARNOLDI_K, max_iter=ARNOLDI_ITERS,
                                          regularization=lam)
        att.cache(_loader(q.x_train, q.y_train, len(q.x_train)))
        s = att.attribute(_loader(q.x_left_out, q.y_left_out, 100), _loader(q.x_test, q.y_test, 100)).T
        return s / q.n_train  # dattri omits the 1/n of g_testᵀ(H+λI)⁻¹g_j / n
    return run


def _kronfluence(strategy: str):
    """kronfluence's EK-FAC / K-FAC (`tda.peers`) at the same absolute damping λ = MULTIPLE × λ₀."""
    def run(p: AttributionProblem):
        from tda.peers import kronfluence_scores

        torch.manual_seed(0)
        return kronfluence_scores(p, strategy, MULTIPLE * base_damping(p.model, p.x_train, p.y_train, p.task))
    return run


def _cases():
    Case = _methods().Case  # noqa: N806

    return [
        Case(f"cg[gn, {CG_ITERS} it, block of 100, {N_ROWS} rows]", "folktables_sized_3k", _cg(True),
             {"cg one test instance at a time": _cg(False, "gn", 10)}),
        Case(f"cg[hessian λ={PEER_DAMPING}, {CG_ITERS} it, {N_ROWS} rows]", "folktables_sized_3k", _cg(True, "hessian"),
             {"dattri IFAttributorCG": _dattri("cg")}),
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
        Case(f"cg[gn, {CG_ITERS} it, block of 100, {CNN_CG_ROWS} rows]", "resnet9_cifar", _cg(True, rows=CNN_CG_ROWS),
             {"cg one test instance at a time": _cg(False, "gn", 10, rows=CNN_CG_ROWS)}),
        Case("ekfac[4,000 rows]", "resnet9_cifar", lambda p: EKFAC(damping_multiple=MULTIPLE).scores(p), {}),
        Case("kfac[4,000 rows]", "resnet9_cifar", lambda p: KFAC(damping_multiple=MULTIPLE).scores(p), {}),
    ]


class _LazyCases(list):
    """Built on first use: `methods.Case` is importable only once methods.py is loaded."""

    def __iter__(self):
        if not len(self):
            self.extend(_cases())
        return super().__iter__()


CASES = _LazyCases()


def hessian_product_modes(cache: Path, reps: int = 20, rounds: int = 5) -> dict:
    """One-column Hessian-vector products over N_ROWS rows of folktables_sized_3k, timed side by
    side (alternating, best of `rounds`): `CurvatureOperator.matvec` (reverse over reverse, no
    vmap for one column) against forward over reverse (`jvp` of `grad`) under `vmap`, the
    operator's previous form. Returns ms per product, the ratio and the largest difference."""
    import time

    from torch.func import functional_call, grad, jvp, vmap

    from tda.methods.hessian import CurvatureOperator
    from tda.models.base import per_example_loss

    p = _methods().load_problem("folktables_sized_3k", cache, 2048.0)
    x, y = p.x_train[:N_ROWS], p.y_train[:N_ROWS]
    op = CurvatureOperator(p.model, x, y, p.task, "hessian", N_ROWS)
    v = torch.randn(op.n_params, 1, generator=torch.Generator().manual_seed(0))

    def loss_sum(params):
        return per_example_loss(functional_call(op.model, (params, op.const), (x,)), y, p.task).sum()

    def fwd_over_rev(V):
        out = vmap(lambda t: jvp(grad(loss_sum), (op.params,), (t,))[1])(vmap(op.space.unflat, in_dims=1)(V))
        return torch.cat([out[k].reshape(V.shape[1], -1) for k in op.space.names], dim=1).T / len(x)

    modes = {"reverse_over_reverse": lambda: op.matvec(v), "forward_over_reverse_vmap": lambda: fwd_over_rev(v)}
    best = {k: float("inf") for k in modes}
    for _ in range(rounds):
        for k, f in modes.items():
            f()
            t = time.perf_counter()
            for _ in range(reps):
                f()
            best[k] = min(best[k], (time.perf_counter() - t) / reps * 1e3)
    diff = float((op.matvec(v) - fwd_over_rev(v)).abs().max())
    return {"ms_per_product": best, "speedup": best["forward_over_reverse_vmap"] / best["reverse_over_reverse"],
            "max_abs_diff": diff, "threads": torch.get_num_threads()}


if __name__ == "__main__":
    import argparse

    import methods

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--problems", default="folktables_sized_3k,folktables_sized")
    ap.add_argument("--cases", default="cg,arnoldi,ekfac,kfac")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--cache", default="/tmp/tda_bench_methods_influence",
                    help="problem cache and scratch (own directory, so it can run next to methods.py)")
    ap.add_argument("--hessian-modes", action="store_true",
                    help="only time one-column Hessian products, reverse vs forward over reverse")
    a = ap.parse_args()
    if a.hessian_modes:
        import json

        print(json.dumps(hessian_product_modes(Path(a.cache)), indent=1))
        raise SystemExit
    argv = ["--problems", a.problems, "--cases", a.cases, "--timeout", str(a.timeout), "--cache", a.cache]
    methods.main(argv + (["--out", str(a.out)] if a.out else []))
