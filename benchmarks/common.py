"""What the method benchmarks share: the problems, the rows, and the runner that measures
every case in its own subprocess.

`benchmarks/methods.py` (all methods) and `benchmarks/methods_influence.py` (the influence
functions, and the curvature products) each define a list of :class:`Case` and hand it to
:func:`run` with their own script path, which the measuring subprocesses re-run.

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

"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from tda.artifacts import load_tensors, save_tensors
from tda.data.cifar10 import cifar10
from tda.memory import PeakMemory
from tda.models.mlp import MLP
from tda.models.resnet9 import ResNet9
from tda.problem import AttributionProblem

ROOT = Path(__file__).resolve().parents[1]
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
    if name == "resnet9_cifar":
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
                              memory_budget_mb=budget_mb)


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


# ----------------------------------------------------------------------------------- running
def measure(case: Case, which: str, cache: Path, budget_mb: float, out: Path, device: str = "cpu") -> None:
    """Child process: run one runner of one case, write scores + time + memory to `out`."""
    torch.set_num_threads(torch.get_num_threads())
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


def run_child(script: str, case_index: int, which: str, cache: Path, budget_mb: float, timeout: float,
              device: str = "cpu") -> dict | None:
    """Run `python -m benchmarks.<script> --child case_index which ...` (a subprocess that calls
    :func:`measure`; `script` is the benchmark's file) and read back its row: scores, seconds,
    peak_mb, test_rows, note; or {"error": ...}."""
    out = cache / f"result_{case_index}.safetensors"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", f"{__package__}.{Path(script).stem}", "--child", str(case_index), which, str(out),
           "--cache", str(cache), "--budget-mb", str(budget_mb), "--device", device]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    if proc.returncode != 0 or not out.is_file():
        # the exception's line, not a progress bar's last redraw
        lines = [ln for ln in (proc.stderr or proc.stdout or "").replace("\r", "\n").splitlines() if ln.strip()]
        errors = [ln for ln in lines if "Error" in ln or "Killed" in ln]
        if proc.returncode < 0 and not errors:  # killed by a signal (SIGKILL: the kernel's out-of-memory killer)
            last = lines[-1].strip() if lines else "no output"
            return {"error": f"killed by signal {-proc.returncode} after {last!r}"}
        return {"error": (errors or lines or [f"failed with exit status {proc.returncode}"])[-1].strip()}
    with safe_open(str(out), "pt") as f:
        meta = json.loads(f.metadata()["json"])
        meta["scores"] = f.get_tensor("scores")
    return meta


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


def arguments(description: str, problems: str, cache: Path) -> argparse.ArgumentParser:
    """The command line every method benchmark takes (`problems`, `cache`: its defaults)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--problems", default=problems)
    ap.add_argument("--cases", default=None, help="comma-separated method names (default: all)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--cache", type=Path, default=cache,
                    help="problem cache and scratch (one per script, so that they can run side by side)")
    ap.add_argument("--budget-mb", type=float, default=2048.0)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per measurement")
    ap.add_argument("--device", default="cpu",
                    help="where our methods run, e.g. cuda (peak_mb stays the process's resident CPU memory)")
    ap.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    return ap


def run(cases: Callable[[], list[Case]], script: str, args: argparse.Namespace) -> list[dict]:
    """Measure the `cases()` selected by `args` (from :func:`arguments`), each runner in a
    subprocess of `script` (which must call this with the same `cases`); print and return the
    rows. With `--child` this is that subprocess."""
    args.cache.mkdir(parents=True, exist_ok=True)
    if args.child:
        measure(cases()[int(args.child[0])], args.child[1], args.cache, args.budget_mb, Path(args.child[2]),
                args.device)
        return []
    load_problem("folktables_sized", args.cache, args.budget_mb)  # build the cached problem once
    problems = set(args.problems.split(","))
    wanted = set(args.cases.split(",")) if args.cases else None
    rows = []
    for i, case in enumerate(cases()):
        if case.problem not in problems or (wanted and case.method.split("[")[0] not in wanted):
            continue
        mine = run_child(script, i, "__ours__", args.cache, args.budget_mb, args.timeout, args.device)
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
            base = run_child(script, i, name, args.cache, args.budget_mb, args.timeout, args.device)
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
    """The rows as a markdown table."""
    head = "| method | problem | ours s | ours MB | baseline | baseline s | baseline MB | speedup | agreement |\n"
    head += "|---|---|---|---|---|---|---|---|---|\n"

    def fmt(v):
        return "—" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))

    return head + "".join(f"| {r['method']} | {r['problem']} | {fmt(r['seconds'])} | {fmt(r['peak_mb'])} | "
                          f"{r['baseline']} | {fmt(r['baseline_seconds'])} | {fmt(r['baseline_peak_mb'])} | "
                          f"{fmt(r['speedup'])} | {fmt(r['agreement'])} |\n" for r in rows)
