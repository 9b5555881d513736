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
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
import torch._dynamo  # torch imports it lazily on a first torch.func transform: before any clock
from safetensors import safe_open

from tda.artifacts import IntegrityError, load_tensors, load_tensors_with_metadata, save_tensors
from tda.data.cifar10 import cifar10
from tda.memory import PeakMemory
from tda.models.mlp import MLP
from tda.models.resnet9 import ResNet9
from tda.problem import AttributionProblem
from tda.provenance import ProvenanceError, require_match

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


def problem_file(name: str, cache: Path) -> Path:
    """The cached file a problem is built from (folktables_sized_3k: the first rows of folktables_sized's)."""
    return cache / ("resnet9_cifar.safetensors" if name == "resnet9_cifar" else "folktables_sized.safetensors")


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
    factor by which the measured time is extrapolated to all of them; `phases`: our method's
    own account of where the time went (`Method.record["seconds"]`, checks as `check_*`)."""

    scores: torch.Tensor
    test_rows: list[int] | None = None
    extrapolate: float = 1.0
    note: str = ""
    phases: dict[str, float] | None = None


@dataclass
class Staged:
    """A runner in two parts: `setup(problem)`, done before the clock starts — what a user of
    the method already holds (the absolute damping a peer is given, the multiple of λ₀ it
    corresponds to) or a library's one-time import — and `run(problem, setup's value)`, timed.
    `package`: the public library a baseline comes from (its version keys its cached rows;
    None: tda's own reference formulations, keyed by tda's source)."""

    run: Callable[[AttributionProblem, Any], "torch.Tensor | Result"]
    setup: Callable[[AttributionProblem], Any] | None = None
    package: str | None = None


Runner = Callable[[AttributionProblem], "torch.Tensor | Result"] | Staged


@dataclass
class Case:
    method: str
    problem: str
    run: Runner
    baselines: dict[str, Runner] = field(default_factory=dict)


# ----------------------------------------------------------------------------------- baseline cache
PEERS = ("dattri", "kronfluence", "traker")


def _versions() -> dict[str, str | None]:
    out = {"python": sys.version.split()[0], "torch": torch.__version__, "threads": str(torch.get_num_threads()),
           "cpus": str(os.cpu_count()), "memory_gb": str(round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                                                               / 2**30))}
    for name in PEERS:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _sources(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(str(path.relative_to(ROOT)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def baseline_key(case: Case, which: str, script: str, problem_checksum: str, context: Any) -> dict[str, Any]:
    """What a baseline's cached row was measured from: the case and baseline names, the
    problem's content, the setup's value (e.g. the damping it was given), the peers' and
    torch's versions and the thread count, and the source of the benchmark scripts (plus
    tda's own source for tda's reference formulations, whose results it determines)."""
    runner = case.baselines[which]
    package = runner.package if isinstance(runner, Staged) else None
    code = [Path(script), Path(__file__), ROOT / "benchmarks" / "peers.py", ROOT / "benchmarks" / "methods.py",
            ROOT / "benchmarks" / "methods_influence.py"]
    if package is None:
        code += list((ROOT / "tda").rglob("*.py"))
    return {"case": case.method, "problem": case.problem, "baseline": which, "problem_checksum": problem_checksum,
            "setup": _plain(context), "package": package, "versions": _versions(),
            "code": _sources(list(dict.fromkeys(p.resolve() for p in code if p.is_file())))}


def _plain(value: Any) -> Any:
    """A setup's value as the key holds it: floats to 12 significant digits (the parent and the
    child each compute it), containers element by element, anything else by repr."""
    if isinstance(value, float):
        return float(f"{value:.12g}")
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value if value is None or isinstance(value, (bool, int, str)) else repr(value)


def _cache_path(cache: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache / "baselines" / f"{digest}.safetensors"


def _cached(cache: Path, key: dict[str, Any]) -> dict | None:
    """The stored row for `key`, verified (content checksum, and the key it records)."""
    path = _cache_path(cache, key)
    if not path.is_file():
        return None
    try:
        tensors, meta, _ = load_tensors_with_metadata(path)
        require_match(meta, {"key": key}, f"the cached baseline row {path}", "measuring it again")
    except (IntegrityError, ProvenanceError) as err:
        print(f"  (cached baseline row ignored: {err})", flush=True)
        return None
    return {**meta["row"], "scores": tensors.get("scores")}


# ----------------------------------------------------------------------------------- running
def measure(case: Case, which: str, cache: Path, budget_mb: float, out: Path, device: str = "cpu",
            script: str | None = None) -> None:
    """Child process: run one runner of one case, write scores + time + memory to `out` (and a
    baseline's row to the baseline cache). One-time imports happen before the clock starts: a
    Staged runner's setup, and torch._dynamo (imported with this module), which torch imports
    lazily on a process's first torch.func transform (seconds of import, not of the method)."""
    problem = load_problem(case.problem, cache, budget_mb)
    problem.device = torch.device(device)  # where our methods run (peers choose their own)
    runner = case.run if which == "__ours__" else case.baselines[which]
    context = runner.setup(problem) if isinstance(runner, Staged) and runner.setup is not None else None
    load = os.getloadavg()[0]
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        res = runner.run(problem, context) if isinstance(runner, Staged) else runner(problem)
        if problem.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    res = res if isinstance(res, Result) else Result(res)
    row = {"seconds": seconds * res.extrapolate, "measured_seconds": seconds, "peak_mb": mem.peak_mb,
           "test_rows": res.test_rows, "note": res.note, "phases": res.phases, "measured": _now(),
           "load": [load, os.getloadavg()[0]]}
    scores = {"scores": res.scores.detach().double().cpu()}
    save_tensors(out, scores, metadata=row)
    if which != "__ours__" and script is not None:
        key = baseline_key(case, which, script, problem_checksum(case.problem, cache), context)
        store_baseline(cache, key, row, scores)


def problem_checksum(name: str, cache: Path) -> str:
    return load_tensors_with_metadata(problem_file(name, cache))[2]


def store_baseline(cache: Path, key: dict[str, Any], row: dict[str, Any], scores: dict[str, torch.Tensor]) -> None:
    """Keep a baseline's row (or its failure: `row["error"]`, no scores) for `key`."""
    path = _cache_path(cache, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(path, scores, metadata={"key": key, "row": row})


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def run_child(script: str, case_index: int, which: str, cache: Path, budget_mb: float, timeout: float,
              device: str = "cpu") -> dict:
    """Run `python -m benchmarks.<script> --child case_index which ...` (a subprocess that calls
    :func:`measure`; `script` is the benchmark's file) and read back its row: scores, seconds,
    peak_mb, test_rows, note, phases; or {"error": ...}."""
    out = cache / f"result_{os.getpid()}_{case_index}.safetensors"  # this run's own: runs may share a cache
    out.unlink(missing_ok=True)
    threads = str(torch.get_num_threads())  # the parent's (--threads), for every library's pool
    cmd = [sys.executable, "-m", f"{__package__}.{Path(script).stem}", "--child", str(case_index), which, str(out),
           "--cache", str(cache), "--budget-mb", str(budget_mb), "--device", device, "--threads", threads]
    try:
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
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
        meta["scores"] = f.get_tensor("scores") if "scores" in f.keys() else None
    out.unlink()
    return meta


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


def arguments(description: str, problems: str, cache: Path, out: Path) -> argparse.ArgumentParser:
    """The command line every method benchmark takes (`problems`, `cache`, `out`: its defaults)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--problems", default=problems)
    ap.add_argument("--cases", default=None, help="comma-separated method names (default: all)")
    ap.add_argument("--out", type=Path, default=out, help="the rows as JSON, rewritten as each row finishes")
    ap.add_argument("--cache", type=Path, default=cache,
                    help="problem cache, scratch and cached baseline rows (one per script, so that they can run "
                         "side by side)")
    ap.add_argument("--fresh", action="store_true",
                    help="measure every baseline now instead of reusing cached rows with the same key")
    ap.add_argument("--skip", default="",
                    help="comma-separated substrings of '<problem>:<baseline>' not to run (e.g. a peer that needs "
                         "more memory than a shared machine has free); their rows say so")
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads of every measurement (and of the peers' libraries)")
    ap.add_argument("--budget-mb", type=float, default=2048.0)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per measurement")
    ap.add_argument("--device", default="cpu",
                    help="where our methods run, e.g. cuda (peak_mb stays the process's resident CPU memory)")
    ap.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    return ap


def _row(case: Case, mine: dict, name: str | None, base: dict | None) -> dict:
    """One row of the table: ours against baseline `name` (None: no baseline)."""
    row = {"method": case.method, "problem": case.problem}
    if "error" in mine:
        return row | {"seconds": None, "peak_mb": None, "baseline": name, "baseline_seconds": None,
                      "baseline_peak_mb": None, "speedup": None, "agreement": None, "checks_share": None,
                      "phases": None, "note": f"FAILED: {mine['error']}", "load": None}
    phases = mine.get("phases")
    checks = sum(v for k, v in (phases or {}).items() if k.startswith("check"))
    row |= {"seconds": round(mine["seconds"], 4), "peak_mb": round(mine["peak_mb"], 1), "baseline": name,
            "checks_share": round(checks / mine["measured_seconds"], 4) if phases is not None else None,
            "phases": {k: round(v, 4) for k, v in phases.items()} if phases else phases,
            "load": [round(v, 2) for v in mine["load"]]}
    notes = [mine["note"]]
    if base is None:
        row |= {"baseline_seconds": None, "baseline_peak_mb": None, "speedup": None, "agreement": None}
        notes.append("no baseline run" if name is None else "")
    elif "error" in base:
        row |= {"baseline_seconds": None, "baseline_peak_mb": None, "speedup": None, "agreement": None}
        notes.append(f"baseline failed: {base['error']}" + (f" (cached row of {base['measured']})"
                                                            if base.get("cached") else ""))
    else:
        rows_b = base["test_rows"]
        ours_s = mine["scores"] if rows_b is None else mine["scores"][rows_b]
        row |= {"baseline_seconds": round(base["seconds"], 4), "baseline_peak_mb": round(base["peak_mb"], 1),
                "speedup": round(base["seconds"] / max(mine["seconds"], 1e-9), 2),
                "agreement": round(agreement(ours_s, base["scores"]), 6)}
        notes.append(base["note"])
        if base.get("cached"):
            row["baseline_cached"] = {"measured": base["measured"], "load": base["load"]}
            notes.append(f"baseline row cached (measured {base['measured']}, load {base['load'][0]:.1f})")
    return row | {"note": "; ".join(n for n in notes if n)}


def run(cases: Callable[[], list[Case]], script: str, args: argparse.Namespace) -> list[dict]:
    """Measure the `cases()` selected by `args` (from :func:`arguments`), each runner in a
    subprocess of `script` (which must call this with the same `cases`); print each row as
    it finishes, write them all to `args.out` after each, and return them. A baseline whose
    cached row matches its key (:func:`baseline_key`; the setup's value computed here) is not
    run again unless `--fresh`; a failed baseline is kept as a failure. With `--child` this is
    that subprocess."""
    args.cache.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    if args.child:
        measure(cases()[int(args.child[0])], args.child[1], args.cache, args.budget_mb, Path(args.child[2]),
                args.device, script)
        return []
    problems = set(args.problems.split(","))
    wanted = set(args.cases.split(",")) if args.cases else None
    selected = [(i, c) for i, c in enumerate(cases()) if c.problem in problems
                and (not wanted or c.method.split("[")[0] in wanted)]
    loaded = {name: (load_problem(name, args.cache, args.budget_mb), problem_checksum(name, args.cache))
              for name in sorted({c.problem for _, c in selected})}  # built once, before any timing
    rows, start = [], time.perf_counter()
    print(f"{len(selected)} cases; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} threads per measurement", flush=True)
    for n, (i, case) in enumerate(selected, 1):
        mine = run_child(script, i, "__ours__", args.cache, args.budget_mb, args.timeout, args.device)
        baselines = {}
        for name, runner in case.baselines.items():
            if any(part and part in f"{case.problem}:{name}" for part in args.skip.split(",")):
                baselines[name] = {"error": "not run (--skip)"}
                continue
            problem, checksum = loaded[case.problem]
            context = runner.setup(problem) if isinstance(runner, Staged) and runner.setup is not None else None
            key = baseline_key(case, name, script, checksum, context)
            hit = None if args.fresh else _cached(args.cache, key)
            if hit is not None:
                baselines[name] = hit | {"cached": True}
                continue
            baselines[name] = run_child(script, i, name, args.cache, args.budget_mb, args.timeout, args.device)
            if "error" in baselines[name]:  # kept, so that a run does not wait for a known failure again
                store_baseline(args.cache, key, {"error": baselines[name]["error"], "measured": _now(),
                                                 "load": [os.getloadavg()[0]] * 2}, {})
        for name, base in (baselines or {None: None}).items():
            rows.append(_row(case, mine, name, base))
            print(f"[{n}/{len(selected)}, {time.perf_counter() - start:.0f} s] {json.dumps(rows[-1])}", flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print(markdown(rows))
    print(f"total {time.perf_counter() - start:.0f} s")
    return rows


def markdown(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    head = ("| method | problem | ours s | ours MB | checks | baseline | baseline s | baseline MB | speedup | "
            "agreement |\n|---|---|---|---|---|---|---|---|---|---|\n")

    def fmt(v):
        return "—" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))

    def share(v):
        return "—" if v is None else f"{100 * v:.0f}%"

    return head + "".join(f"| {r['method']} | {r['problem']} | {fmt(r['seconds'])} | {fmt(r['peak_mb'])} | "
                          f"{share(r['checks_share'])} | {r['baseline']} | {fmt(r['baseline_seconds'])} | "
                          f"{fmt(r['baseline_peak_mb'])} | {fmt(r['speedup'])}"
                          f"{'*' if r.get('baseline_cached') else ''} | {fmt(r['agreement'])} |\n" for r in rows)
