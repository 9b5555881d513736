"""Benchmark of the attribution methods against their reference formulations and public peers.

    python benchmarks/methods.py [--problems folktables_sized,folktables_sized_3k] [--cases grad_dot,datainf]
                                 [--out rows.json] [--budget-mb 2048] [--device cpu]

Every measurement runs in a fresh subprocess (so peak memory — the increase of resident memory
over the process's state after loading the problem, `tda.memory.PeakMemory` — is not polluted
by earlier cases) on the same model and data, cached once under --cache. Each row:

    {method, problem, seconds, peak_mb, baseline, baseline_seconds, baseline_peak_mb, speedup,
     agreement, note}

`agreement` is the cosine similarity of the two score matrices (flattened) on the test rows
both computed; `speedup` = baseline_seconds / seconds. A baseline too slow to run on every
test instance runs on the first few and its time is extrapolated linearly in the number of
test instances (the loop is linear in it); the row's note says so.

Problems:
  folktables_sized     30,085 training rows, 791 one-hot inputs with 10 non-zeros per row
                       (10 categorical groups), MLP 791-128-128-2 (118,274 parameters) trained
                       2 epochs; 100 test and 100 left-out instances. Synthetic data with the
                       paper's shapes, so it runs offline and anyone can rebuild it.
  folktables_sized_3k  its first 3,000 training rows: for baselines that hold every training
                       gradient in memory (30,085 × 118k floats would be 14 GB).
  resnet9_cifar        ResNet-9 (width 0.25, 0.41M parameters, batch norm in eval mode) trained
                       3 epochs on the 4,000 local CIFAR-10 training images ($TDA_DATA_DIR/cifar10
                       or ../shared/data/cifar10; built once and cached); the first 100 test
                       images, 100 left-out training images.

Cases are rows of `CASES` (a list of :class:`Case`); `benchmarks/methods_influence.py`, when
present, contributes its own `CASES` in the same format and they are appended.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from tda.artifacts import load_tensors, save_tensors  # noqa: E402
from tda.memory import PeakMemory  # noqa: E402
from tda.problem import AttributionProblem  # noqa: E402
from tda.models.mlp import MLP  # noqa: E402

N_TRAIN, GROUPS, N_TEST, N_LEFT_OUT = 30_085, [80] * 9 + [71], 100, 100


# ----------------------------------------------------------------------------------- problems
def _build_folktables_sized(path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    n = N_TRAIN + N_TEST
    x = torch.cat([torch.nn.functional.one_hot(torch.randint(0, k, (n,), generator=g), k) for k in GROUPS], 1).float()
    w = torch.randn(x.shape[1], generator=g)
    y = ((x @ w) / math.sqrt(len(GROUPS)) + 0.7 * torch.randn(n, generator=g) > 0).long()
    torch.manual_seed(0)
    model = MLP([x.shape[1]], 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(2):
        for idx in torch.randperm(N_TRAIN, generator=g).split(128):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    left_out = torch.randperm(N_TRAIN, generator=g)[:N_LEFT_OUT]
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update(x_train=x[:N_TRAIN], y_train=y[:N_TRAIN], x_test=x[N_TRAIN:], y_test=y[N_TRAIN:], left_out=left_out)
    save_tensors(path, tensors)


def _build_resnet9_cifar(path: Path) -> None:
    import os

    from tda.data.cifar10 import cifar10
    from tda.models.resnet9 import ResNet9

    root = Path(os.environ.get("TDA_DATA_DIR", ROOT.parent / "shared" / "data")) / "cifar10"
    data = cifar10(root=str(root))
    x, y = data.tensors("train")
    xt, yt = data.tensors("test")
    torch.manual_seed(0)
    model = ResNet9([3, 32, 32], 10, width=0.25)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(3):
        for idx in torch.randperm(len(x), generator=g).split(128):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update(x_train=x, y_train=y, x_test=xt[:N_TEST], y_test=yt[:N_TEST],
                   left_out=torch.randperm(len(x), generator=g)[:N_LEFT_OUT])
    save_tensors(path, tensors)


def load_problem(name: str, cache: Path, budget_mb: float) -> AttributionProblem:
    from omegaconf import OmegaConf
    if name == "resnet9_cifar":
        from tda.models.resnet9 import ResNet9

        path = cache / "resnet9_cifar.safetensors"
        if not path.is_file():
            _build_resnet9_cifar(path)
        t = load_tensors(path)
        model = ResNet9([3, 32, 32], 10, width=0.25)
        model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
        model.eval()
        return AttributionProblem(model=model, task="classification", x_train=t["x_train"], y_train=t["y_train"],
                                  x_test=t["x_test"], y_test=t["y_test"], left_out_indices=t["left_out"],
                                  test_indices=torch.arange(len(t["x_test"])), memory_budget_mb=budget_mb)
    path = cache / "folktables_sized.safetensors"
    if not path.is_file():
        _build_folktables_sized(path)
    t = load_tensors(path)
    model = MLP([t["x_train"].shape[1]], 2)
    model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
    model.eval()
    x, y, lo = t["x_train"], t["y_train"], t["left_out"]
    if name == "folktables_sized_3k":
        x, y, lo = x[:3000], y[:3000], torch.arange(0, 3000, 30)
    elif name != "folktables_sized":
        raise ValueError(f"unknown problem {name!r}; choose folktables_sized, folktables_sized_3k or resnet9_cifar")
    return AttributionProblem(model=model, task="classification", x_train=x, y_train=y, x_test=t["x_test"],
                              y_test=t["y_test"], left_out_indices=lo, test_indices=torch.arange(len(t["x_test"])),
                              further_training=OmegaConf.create({"batch_size": 128}),
                              further_optimizer=OmegaConf.create({"eps": 1e-8}), memory_budget_mb=budget_mb)


# ----------------------------------------------------------------------------------- cases
@dataclass
class Result:
    """Scores of a run; `test_rows` when only some test instances were computed, and the
    factor by which the measured time is extrapolated to all of them."""

    scores: torch.Tensor
    test_rows: list[int] | None = None
    extrapolate: float = 1.0
    note: str = ""


Runner = Callable[[AttributionProblem], "torch.Tensor | Result"]


@dataclass
class Case:
    method: str
    problem: str
    run: Runner
    baselines: dict[str, Runner] = field(default_factory=dict)


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
    from tda.methods.gradients import ParamLayout, per_example_grads
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


def materialised_grad_dot_adam(p: AttributionProblem) -> torch.Tensor:
    """Adam-preconditioned Grad-Dot from materialised (vmap) per-example gradients streamed
    over the training set: the formulation without the factored moments."""
    from tda.methods.grad_dot_adam import GradDotAdam
    return GradDotAdam(factored=False).scores(p)


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
    from tda.methods.gradients import ParamLayout
    from tda.methods.trak import projection_matrix
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
        tr.start_scoring_checkpoint(exp_name="t", checkpoint=p.model.state_dict(), model_id=0, num_targets=len(p.x_test))
        tr.score(batch=(p.x_test, p.y_test), num_samples=len(p.x_test))
        s = tr.finalize_scores(exp_name="t")  # [n_train, n_test]
    return torch.as_tensor(s).T[:, p.left_out_indices]


def _build_cases() -> list[Case]:
    from tda.methods.datainf import DataInf
    from tda.methods.grad_dot import GradCos, GradDot
    from tda.methods.grad_dot_adam import GradDotAdam
    from tda.methods.trak import TRAK

    cases = [
        Case("grad_dot", "folktables_sized", ours(GradDot),
             {"explicit per-instance loop": ref_grad_dot, "vmap (materialised)": materialised(GradDot),
              "dattri TracIn (no projection)": dattri_grad_dot}),
        Case("grad_cos", "folktables_sized", ours(GradCos),
             {"explicit per-instance loop": lambda p: ref_grad_dot(p, True),
              "dattri Grad-Cos (no projection)": lambda p: dattri_grad_dot(p, True)}),
        # the materialised baselines stream 30,085 × 118k-float gradients: run them on 3k rows
        Case("datainf", "folktables_sized", ours(DataInf), {}),
        Case("datainf", "folktables_sized_3k", ours(DataInf),
             {"authors' per-instance loop": authors_datainf_loop, "vmap (materialised, streamed)": materialised(DataInf)}),
        Case("datainf[module blocks, λ=1e-3]", "folktables_sized_3k", ours(DataInf, damping=1e-3, blocks="module"),
             {"dattri DataInf": lambda p: dattri_datainf(p, 1e-3)}),
        Case("grad_dot_adam", "folktables_sized", ours(GradDotAdam), {}),
        Case("grad_dot_adam", "folktables_sized_3k", ours(GradDotAdam),
             {"vmap (materialised, streamed)": materialised_grad_dot_adam}),
        Case("trak[k=2048]", "folktables_sized", ours(TRAK, proj_dim=2048), {}),
        Case("trak[k=512]", "folktables_sized_3k", ours(TRAK, proj_dim=512),
             {"vmap (materialised) + dense projection": materialised(TRAK, proj_dim=512),
              "traker 0.3.2 (its BasicProjector: another random matrix)": lambda p: traker_trak(p, 512),
              "traker 0.3.2 (given our projection matrix)": lambda p: traker_trak(p, 512, True)}),
    ]
    try:
        from methods_influence import CASES as influence_cases  # noqa: PLC0415
        cases += list(influence_cases)
    except ModuleNotFoundError as e:
        if e.name != "methods_influence":
            raise
    return cases


# ----------------------------------------------------------------------------------- running
def measure(case_index: int, which: str, cache: Path, budget_mb: float, out: Path, device: str = "cpu") -> None:
    """Child process: run one runner of one case, write scores + time + memory to `out`."""
    torch.set_num_threads(torch.get_num_threads())
    case = _build_cases()[case_index]
    problem = load_problem(case.problem, cache, budget_mb)
    problem.device = torch.device(device)  # where our methods run (peers choose their own)
    runner = case.run if which == "__ours__" else case.baselines[which]
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        res = runner(problem)
        if problem.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    res = res if isinstance(res, Result) else Result(res)
    save_tensors(out, {"scores": res.scores.detach().double()},
                 metadata={"seconds": seconds * res.extrapolate, "measured_seconds": seconds, "peak_mb": mem.peak_mb,
                           "test_rows": res.test_rows, "note": res.note})


def run_child(case_index: int, which: str, cache: Path, budget_mb: float, timeout: float,
              device: str = "cpu") -> dict | None:
    import json as _json

    from safetensors import safe_open
    out = cache / f"result_{case_index}.safetensors"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--child", str(case_index), which, str(out), "--cache", str(cache),
           "--budget-mb", str(budget_mb), "--device", device]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    if proc.returncode != 0 or not out.is_file():
        # the exception's line, not a progress bar's last redraw
        lines = [ln for ln in (proc.stderr or proc.stdout or "").replace("\r", "\n").splitlines() if ln.strip()]
        errors = [ln for ln in lines if "Error" in ln or "Killed" in ln]
        if proc.returncode < 0 and not errors:  # killed by a signal (SIGKILL: the kernel's out-of-memory killer)
            return {"error": f"killed by signal {-proc.returncode} after {lines[-1].strip() if lines else 'no output'!r}"}
        return {"error": (errors or lines or [f"failed with exit status {proc.returncode}"])[-1].strip()}
    with safe_open(str(out), "pt") as f:
        meta = _json.loads(f.metadata()["json"])
        meta["scores"] = f.get_tensor("scores")
    return meta


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", default="folktables_sized,folktables_sized_3k")
    ap.add_argument("--cases", default=None, help="comma-separated method names (default: all)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/tda_bench_methods"))
    ap.add_argument("--budget-mb", type=float, default=2048.0)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per measurement")
    ap.add_argument("--device", default="cpu",
                    help="where our methods run, e.g. cuda (peak_mb stays the process's resident CPU memory)")
    ap.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    if args.child:
        measure(int(args.child[0]), args.child[1], args.cache, args.budget_mb, Path(args.child[2]), args.device)
        return []
    load_problem("folktables_sized", args.cache, args.budget_mb)  # build the cached problem once
    problems = set(args.problems.split(","))
    wanted = set(args.cases.split(",")) if args.cases else None
    rows = []
    for i, case in enumerate(_build_cases()):
        if case.problem not in problems or (wanted and case.method.split("[")[0] not in wanted):
            continue
        mine = run_child(i, "__ours__", args.cache, args.budget_mb, args.timeout, args.device)
        if "error" in mine:
            print(f"{case.method} on {case.problem}: FAILED: {mine['error']}", flush=True)
            continue
        if not case.baselines:
            row = {"method": case.method, "problem": case.problem, "seconds": round(mine["seconds"], 4),
                   "peak_mb": round(mine["peak_mb"], 1), "baseline": None, "baseline_seconds": None,
                   "baseline_peak_mb": None, "speedup": None, "agreement": None,
                   "note": "; ".join(n for n in (mine["note"], "no baseline run") if n)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        for name in case.baselines:
            base = run_child(i, name, args.cache, args.budget_mb, args.timeout, args.device)
            row = {"method": case.method, "problem": case.problem, "seconds": round(mine["seconds"], 4),
                   "peak_mb": round(mine["peak_mb"], 1), "baseline": name}
            if "error" in base:
                row.update(baseline_seconds=None, baseline_peak_mb=None, speedup=None, agreement=None,
                           note=f"baseline failed: {base['error']}")
            else:
                rows_b = base["test_rows"]
                ours_s = mine["scores"] if rows_b is None else mine["scores"][rows_b]
                row.update(baseline_seconds=round(base["seconds"], 4), baseline_peak_mb=round(base["peak_mb"], 1),
                           speedup=round(base["seconds"] / max(mine["seconds"], 1e-9), 2),
                           agreement=round(agreement(ours_s, base["scores"]), 6),
                           note="; ".join(n for n in (mine["note"], base["note"]) if n))
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))
    print(markdown(rows))
    return rows


def markdown(rows: list[dict]) -> str:
    head = "| method | problem | ours s | ours MB | baseline | baseline s | baseline MB | speedup | agreement |\n"
    head += "|---|---|---|---|---|---|---|---|---|\n"
    fmt = lambda v: "—" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))  # noqa: E731
    return head + "".join(f"| {r['method']} | {r['problem']} | {fmt(r['seconds'])} | {fmt(r['peak_mb'])} | {r['baseline']} | "
                          f"{fmt(r['baseline_seconds'])} | {fmt(r['baseline_peak_mb'])} | {fmt(r['speedup'])} | "
                          f"{fmt(r['agreement'])} |\n" for r in rows)


if __name__ == "__main__":
    main()
