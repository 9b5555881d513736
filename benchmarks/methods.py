"""Benchmark of the attribution methods against their reference formulations and public peers.

    python -m benchmarks.methods [--problems folktables_sized,folktables_sized_3k] [--cases grad_dot,datainf]
                                 [--out rows.json] [--budget-mb 2048] [--device cpu]

The problems, the row format and the subprocess per measurement are those of
`benchmarks/common.py`. The cases are the first-order methods' (Grad-Dot, Grad-Cos, DataInf,
Grad-Dot-Adam, TRAK) below, then the influence functions' of `benchmarks/methods_influence.py`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.common import Case, Result, Runner, arguments, run
from benchmarks.methods_influence import influence_cases
from tda.methods.datainf import DataInf
from tda.methods.grad_dot import GradCos, GradDot
from tda.methods.grad_dot_adam import GradDotAdam
from tda.methods.gradients import per_example_grads
from tda.methods.layout import ParamLayout
from tda.methods.trak import TRAK, projection_matrix
from tda.problem import AttributionProblem


# --- references and peers -------------------------------------------------------------------
def _explicit_grads(model, x, y) -> torch.Tensor:
    """One autograd call per instance: [n, n_params]."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(len(x)):
        loss = torch.nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def ref_grad_dot(p: AttributionProblem, normalize: bool = False) -> torch.Tensor:
    gt, gl = _explicit_grads(p.model, p.x_test, p.y_test), _explicit_grads(p.model, p.x_left_out, p.y_left_out)
    if normalize:
        gt, gl = gt / gt.norm(dim=1, keepdim=True), gl / gl.norm(dim=1, keepdim=True)
    return gt @ gl.T


def _dattri_task(p: AttributionProblem):
    from dattri.task import AttributionTask
    model = p.model

    def loss(params, data):
        xb, yb = data
        # TracIn hands one example ([d]); DataInf's cache hands it with a batch axis ([1, d])
        xb = xb.unsqueeze(0) if xb.dim() == 1 else xb
        return torch.nn.functional.cross_entropy(torch.func.functional_call(model, params, xb), yb.view(-1))

    return AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())


def _loader(x, y, bs=256):
    from torch.utils.data import DataLoader, TensorDataset
    return DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=False)


def dattri_grad_dot(p: AttributionProblem, normalize: bool = False) -> torch.Tensor:
    from dattri.algorithm.tracin import TracInAttributor
    att = TracInAttributor(task=_dattri_task(p), weight_list=torch.ones(1), normalized_grad=normalize)
    att.projector_kwargs = None  # dattri projects to 512 dims by default; exact Grad-Dot needs it off
    return att.attribute(_loader(p.x_left_out, p.y_left_out), _loader(p.x_test, p.y_test)).T


def authors_datainf_loop(p: AttributionProblem, n_test: int = 10, c: float = 10.0) -> Result:
    """The DataInf authors' formulation (`compute_hvp_proposed` in their repository, used by
    fimoda): per-instance training gradients held in memory, then per test instance and per
    tensor a Python loop over every training instance. Runs `n_test` test instances, with one
    intra-op thread (tiny ops gain nothing from threads; on a loaded machine they lose a lot),
    which favours the baseline."""
    torch.set_num_threads(1)
    layout = ParamLayout.of(p.model)
    sl = list(layout.slices().values())
    tr = per_example_grads(p.model, p.x_train, p.y_train, p.task)
    tr_dict = {i: {k: tr[i, s] for k, s in enumerate(sl)} for i in range(len(tr))}
    del tr
    lo = per_example_grads(p.model, p.x_left_out, p.y_left_out, p.task)
    te = per_example_grads(p.model, p.x_test[:n_test], p.y_test[:n_test], p.task)
    n = len(tr_dict)
    lam = {}
    for k in range(len(sl)):
        S = torch.zeros(n)
        for i in tr_dict:
            S[i] = torch.mean(tr_dict[i][k] ** 2)
        lam[k] = torch.mean(S) / c
    out = torch.zeros(n_test, len(lo), dtype=torch.float64)
    for t in range(n_test):
        for k, s in enumerate(sl):
            v = te[t, s]
            hvp = torch.zeros_like(v)
            for i in tr_dict:
                g = tr_dict[i][k]
                coef = torch.sum(v * g) / (lam[k] + torch.sum(g ** 2))
                hvp += (v - coef * g) / (n * lam[k])
            out[t] += (lo[:, s] @ hvp).double()
    return Result(out, list(range(n_test)), len(p.x_test) / n_test,
                  f"authors' loop run on {n_test} of {len(p.x_test)} test instances, time extrapolated linearly")


def dattri_datainf(p: AttributionProblem, damping: float) -> torch.Tensor:
    from dattri.algorithm.influence_function import IFAttributorDataInf
    att = IFAttributorDataInf(task=_dattri_task(p), regularization=damping)
    att.cache(_loader(p.x_train, p.y_train))
    return att.attribute(_loader(p.x_left_out, p.y_left_out), _loader(p.x_test, p.y_test)).T


# Grad-Dot-Adam's further training on the Folktables-sized problems: Adam's ε, batch 128
ADAM = {"eps": 1e-8, "batch_size": 128}


def materialised_grad_dot_adam(p: AttributionProblem) -> torch.Tensor:
    """Adam-preconditioned Grad-Dot from materialised (vmap) per-example gradients streamed
    over the training set: the formulation without the factored moments."""
    return GradDotAdam(factored=False, **ADAM).scores(p)


def materialised(method_cls, **kw) -> Runner:
    return lambda p: method_cls(factored=False, **kw).scores(p)


def ours(method_cls, **kw) -> Runner:
    return lambda p: method_cls(**kw).scores(p)


def traker_trak(p: AttributionProblem, proj_dim: int, same_projection: bool = False) -> torch.Tensor:
    """MadryLab's TRAKer on CPU with one model, full precision; its BasicProjector, or (with
    `same_projection`) a projector applying our seeded matrix, so that the scores must agree."""
    import tempfile

    from trak import TRAKer
    from trak.projectors import AbstractProjector, BasicProjector, ProjectionType
    from trak.utils import vectorize
    layout = ParamLayout.of(p.model)
    n_params = layout.n_params

    class OurProjection(AbstractProjector):
        def __init__(self):
            blocks = projection_matrix(layout, proj_dim, 0)
            self.P = torch.cat([blocks[k] for k in layout.names])
            super().__init__(n_params, proj_dim, 0, ProjectionType.normal, "cpu")

        def project(self, grads, model_id):
            return (vectorize(grads, device="cpu") if isinstance(grads, dict) else grads) @ self.P

    with tempfile.TemporaryDirectory() as d:
        if same_projection:
            proj = OurProjection()
        else:
            proj = BasicProjector(grad_dim=n_params, proj_dim=proj_dim, seed=0, proj_type=ProjectionType.normal,
                                  device="cpu", block_size=128, dtype=torch.float32)
        tr = TRAKer(model=p.model, task="image_classification", train_set_size=p.n_train, save_dir=d, device="cpu",
                    projector=proj, proj_dim=proj_dim, use_half_precision=False)
        tr.load_checkpoint(p.model.state_dict(), model_id=0)
        for i in range(0, p.n_train, 512):
            xb, yb = p.x_train[i:i + 512], p.y_train[i:i + 512]
            tr.featurize(batch=(xb, yb), num_samples=len(xb))
        tr.finalize_features()
        tr.start_scoring_checkpoint(exp_name="t", checkpoint=p.model.state_dict(), model_id=0,
                                    num_targets=len(p.x_test))
        tr.score(batch=(p.x_test, p.y_test), num_samples=len(p.x_test))
        s = tr.finalize_scores(exp_name="t")  # [n_train, n_test]
    return torch.as_tensor(s).T[:, p.left_out_indices]


def cases() -> list[Case]:
    """Every case: the first-order methods' here, then the influence functions'."""
    return [
        Case("grad_dot", "folktables_sized", ours(GradDot),
             {"explicit per-instance loop": ref_grad_dot, "vmap (materialised)": materialised(GradDot),
              "dattri TracIn (no projection)": dattri_grad_dot}),
        Case("grad_cos", "folktables_sized", ours(GradCos),
             {"explicit per-instance loop": lambda p: ref_grad_dot(p, True),
              "dattri Grad-Cos (no projection)": lambda p: dattri_grad_dot(p, True)}),
        # the materialised baselines stream 30,085 × 118k-float gradients: run them on 3k rows
        Case("datainf", "folktables_sized", ours(DataInf), {}),
        Case("datainf", "folktables_sized_3k", ours(DataInf),
             {"authors' per-instance loop": authors_datainf_loop,
              "vmap (materialised, streamed)": materialised(DataInf)}),
        Case("datainf[module blocks, λ=1e-3]", "folktables_sized_3k", ours(DataInf, damping=1e-3, blocks="module"),
             {"dattri DataInf": lambda p: dattri_datainf(p, 1e-3)}),
        Case("grad_dot_adam", "folktables_sized", ours(GradDotAdam, **ADAM), {}),
        Case("grad_dot_adam", "folktables_sized_3k", ours(GradDotAdam, **ADAM),
             {"vmap (materialised, streamed)": materialised_grad_dot_adam}),
        Case("trak[k=2048]", "folktables_sized", ours(TRAK, proj_dim=2048), {}),
        Case("trak[k=512]", "folktables_sized_3k", ours(TRAK, proj_dim=512),
             {"vmap (materialised) + dense projection": materialised(TRAK, proj_dim=512),
              "traker 0.3.2 (its BasicProjector: another random matrix)": lambda p: traker_trak(p, 512),
              "traker 0.3.2 (given our projection matrix)": lambda p: traker_trak(p, 512, True)}),
        *influence_cases(),
    ]


def main(argv: list[str] | None = None) -> list[dict]:
    args = arguments(__doc__.split("\n\n")[0], "folktables_sized,folktables_sized_3k",
                     Path("/tmp/tda_bench_methods")).parse_args(argv)
    return run(cases, __file__, args)


if __name__ == "__main__":
    main()
