"""Further-training gold standard: the plain reference loop vs the stacked engine, side by side.

    python -m benchmarks.further_training [--out FILE] [--ref-runs 3] [--optimizer sgd|adam] [--quick]

Folktables-shaped synthetic problem (docs/method.md §5): 30,085 training rows of 791 inputs with 10
non-zeros per row (8 one-hot blocks and 2 standardised columns), MLP 791-128-128-2, batch
128, 100 left-out runs + 1 full run, 100 test instances, one epoch, `drop` removal.

- reference: `tda.further_training.reference.further_train_run` (one model, one torch.optim
  optimizer, RandomSampler batches), float32, timed on `--ref-runs` runs and extrapolated
  per run-epoch;
- engine: all 101 runs as one stacked model (`GroupTrainer`), float32 and float64;
- max_abs_diff_f64: largest difference between the engine's and the reference's loss
  differences (left-out minus full) in float64, on the runs the reference computed;
- matmul_peak_fraction: the engine's matrix-multiply FLOP rate (FLOPs it must do, counted
  from the shapes, over its time) divided by this machine's float32 GEMM rate measured in
  this run;
- projected time of the paper's gold standard (100 seeds x 101 runs x 25 epochs).

It also times ResNet-9 (width 0.25, CIFAR-10 shapes; generic torch.func path) and a
frozen-encoder text head (768 features, Linear head, SST-2 size; MLP fast path) on a few
steps, reference vs engine. Figures go to stdout and, with --out, to a JSON file.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import platform
import time
from pathlib import Path

import torch

from tda.further_training.engine import GroupTrainer
from tda.further_training.optim import optimizer_spec
from tda.further_training.reference import epoch_permutations, further_train_run
from tda.further_training.stacked import build_stacked
from tda.models.mlp import MLP
from tda.models.resnet9 import ResNet9

N_TRAIN, N_TEST, N_IN, BATCH, N_LEFT_OUT = 30_085, 100, 791, 128, 100
BLOCKS = [9, 24, 5, 526, 196, 18, 2, 9]  # one-hot blocks; + 2 standardised columns = 791
OPTIMIZERS = {"sgd": {"_target_": "torch.optim.SGD", "lr": 1e-4},
              "adam": {"_target_": "torch.optim.Adam", "lr": 1e-6}}


def folktables_like(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    parts = [torch.nn.functional.one_hot(torch.randint(0, b, (n,), generator=g), b).float() for b in BLOCKS]
    x = torch.cat([*parts, torch.randn(n, 2, generator=g)], dim=1)
    assert x.shape[1] == N_IN and int((x != 0).sum(1).max()) == 10
    w = torch.randn(N_IN, generator=g)
    y = ((x @ w + 0.5 * torch.randn(n, generator=g)) > 0).long()
    return x, y


def _loadavg() -> list[float] | None:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def gemm_gflops(dtype=torch.float32, size: int = 1024, reps: int = 10) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * size ** 3 * reps / (time.perf_counter() - t) / 1e9


def reference_ms(model, opt, x, y, xt, yt, left_out, epochs=1, seed=0, removal="drop"):
    """(ms per run-epoch, [T, n_test, runs] losses) of the plain loop; runs = [full, *left_out]."""
    kind, hp = optimizer_spec(opt)
    kw = dict(optimizer=functools.partial(getattr(torch.optim, kind), **hp), x=x, y=y, x_test=xt, y_test=yt,
              task="classification", n_epochs=epochs, seed=seed, batch_size=BATCH, removal=removal)
    t = time.perf_counter()
    losses = [further_train_run(model, left_out=j, **kw) for j in [None, *left_out]]
    return (time.perf_counter() - t) * 1e3 / (len(losses) * epochs), torch.stack(losses, -1)


def engine_ms(model, opt, x, y, xt, yt, left_out, epochs=1, seed=0, removal="drop", batch=BATCH, steps=None):
    kind, hp = optimizer_spec(opt)
    R = 1 + len(left_out)
    stacked = build_stacked(model, R, x, y, "classification")
    gt = GroupTrainer(stacked, kind, hp, epoch_permutations(len(x), epochs, seed), torch.tensor([-1, *left_out]),
                      torch.tensor([True] + [False] * len(left_out)), batch, removal, seed, xt, yt)
    t = time.perf_counter()
    if steps is None:
        out = gt.run(epochs)
        return (time.perf_counter() - t) * 1e3 / (R * epochs), out, stacked
    with torch.random.fork_rng(devices=[]):
        for b in range(steps):
            gt.step(0, b)
    return (time.perf_counter() - t) * 1e3 / (R * steps), None, stacked


def engine_matmul_flops_per_run_epoch(sparse: bool) -> float:
    """FLOPs of the matrix products one run needs per epoch (forward, weight gradients, input
    gradients of hidden layers), as the engine computes them."""
    steps = math.ceil(N_TRAIN / BATCH)
    per_row = 0.0
    per_row += 2 * (10 if sparse else N_IN) * 128 * 2  # layer 1: forward + weight gradient
    per_row += 2 * 128 * 128 * 3  # layer 2: forward, weight gradient, input gradient
    per_row += 2 * 128 * 2 * 3  # head
    return per_row * BATCH * steps


def shape_benchmarks(args, results):
    """ResNet-9 (CIFAR-10 shapes) and a frozen-encoder text head: a few steps each."""
    out = {}
    opt = OPTIMIZERS["sgd"]
    try:
        torch.manual_seed(0)
        model = ResNet9([3, 32, 32], 10, width=0.25)
        n = 2048
        x = torch.randn(n, 3, 32, 32)
        y = torch.randint(0, 10, (n,))
        xt, yt = x[:16], y[:16]
        steps, batch, left_out = 3, 64, [1, 2, 3]
        kind, hp = optimizer_spec(opt)

        def ref():
            t = time.perf_counter()
            m = copy.deepcopy(model).train()
            o = getattr(torch.optim, kind)([p for p in m.parameters() if p.requires_grad], **hp)
            perm = epoch_permutations(n, 1, 0)[0]
            for b in range(steps):
                idx = perm[b * batch:(b + 1) * batch]
                o.zero_grad()
                torch.nn.functional.cross_entropy(m(x[idx]), y[idx]).backward()
                o.step()
            return (time.perf_counter() - t) * 1e3 / steps

        r_ms = ref()
        stacked = build_stacked(model, 1 + len(left_out), x, y, "classification")
        gt = GroupTrainer(stacked, kind, hp, epoch_permutations(n, 1, 0), torch.tensor([-1, *left_out]),
                          torch.tensor([True, False, False, False]), batch, "drop", 0, xt, yt)
        t = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            for b in range(steps):
                gt.step(0, b)
        e_ms = (time.perf_counter() - t) * 1e3 / (steps * (1 + len(left_out)))
        out["resnet9_w0.25"] = {"reference_ms_per_run_step": r_ms, "engine_ms_per_run_step": e_ms,
                                "runs_stacked": 1 + len(left_out), "batch": batch, "path": type(stacked).__name__}
    except Exception as err:  # noqa: BLE001 - report, never hide: the table says why the row is missing
        out["resnet9_w0.25"] = {"error": f"{type(err).__name__}: {err}"}
    # frozen-encoder text head: cached 768-d features, Linear(768, 2), SST-2 size, batch 64
    torch.manual_seed(0)
    n, d = 67_349, 768
    x = torch.randn(n, d)
    y = torch.randint(0, 2, (n,))
    head = torch.nn.Linear(d, 2)
    steps = 50
    kind, hp = optimizer_spec({"_target_": "torch.optim.AdamW", "lr": 1e-6, "weight_decay": 0.0})
    m = copy.deepcopy(head)
    o = torch.optim.AdamW(m.parameters(), **hp)
    perm = epoch_permutations(n, 1, 0)[0]
    t = time.perf_counter()
    for b in range(steps):
        idx = torch.cat([perm[b * 64:(b + 1) * 64], torch.tensor([7])])
        w = torch.full((65,), 1 / 64)
        w[-1] = -1 / n
        o.zero_grad()
        (torch.nn.functional.cross_entropy(m(x[idx]), y[idx], reduction="none") * w).sum().backward()
        o.step()
    r_ms = (time.perf_counter() - t) * 1e3 / steps
    R = 51
    stacked = build_stacked(head, R, x, y, "classification")
    gt = GroupTrainer(stacked, kind, hp, epoch_permutations(n, 1, 0), torch.tensor([-1, *range(R - 1)]),
                      torch.tensor([True] + [False] * (R - 1)), 64, "downweight", 0, x[:8], y[:8])
    t = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        for b in range(steps):
            gt.step(0, b)
    e_ms = (time.perf_counter() - t) * 1e3 / (steps * R)
    out["text_head_768"] = {"reference_ms_per_run_step": r_ms, "engine_ms_per_run_step": e_ms, "runs_stacked": R,
                            "batch": 64, "path": type(stacked).__name__}
    results["shapes"] = out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="write the figures as JSON")
    ap.add_argument("--ref-runs", type=int, default=3, help="runs the reference times (full + k-1 left out)")
    ap.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="sgd")
    ap.add_argument("--quick", action="store_true", help="a 4,000-row problem (smoke test of the script)")
    ap.add_argument("--no-shapes", action="store_true", help="skip the ResNet-9 / text-head timings")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = 4_000 if args.quick else N_TRAIN
    x_all, y_all = folktables_like(n + N_TEST)
    x, y, xt, yt = x_all[:n], y_all[:n], x_all[n:], y_all[n:]
    torch.manual_seed(0)
    model = MLP([N_IN], 2, hidden=(128, 128))
    left_out = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:N_LEFT_OUT].tolist()
    opt = OPTIMIZERS[args.optimizer]
    res: dict = {"problem": {"n_train": n, "n_inputs": N_IN, "nonzeros_per_row": 10, "hidden": [128, 128],
                             "batch_size": BATCH, "runs": 1 + N_LEFT_OUT, "n_test": N_TEST, "epochs": 1,
                             "optimizer": opt, "removal": "drop"},
                 "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                             "cpu": platform.processor(), "load_average_at_start": _loadavg()},
                 "reference": "tda.further_training.reference.further_train_run: DataLoader(TensorDataset) + "
                              "RandomSampler, one torch.optim optimizer per run"}
    peak = gemm_gflops()
    print(f"float32 GEMM: {peak:.1f} GFLOP/s ({torch.get_num_threads()} threads)")
    # interleave reference and engine so that load from other processes hits both alike
    ref32, _ = reference_ms(model, opt, x, y, xt, yt, left_out[: args.ref_runs - 1])
    print(f"reference float32: {ref32:.1f} ms per run-epoch ({args.ref_runs} runs timed)")
    eng32, out32, stacked = engine_ms(model, opt, x, y, xt, yt, left_out)
    print(f"engine    float32: {eng32:.1f} ms per run-epoch (101 runs stacked, sparse first layer: {stacked.sparse})")
    m64, x64, xt64 = model.double(), x.double(), xt.double()
    eng64, out64, _ = engine_ms(m64, opt, x64, y, xt64, yt, left_out)
    print(f"engine    float64: {eng64:.1f} ms per run-epoch")
    ref64, ref_losses = reference_ms(m64, opt, x64, y, xt64, yt, left_out[: args.ref_runs - 1])
    print(f"reference float64: {ref64:.1f} ms per run-epoch")
    k = args.ref_runs
    d_ref = ref_losses[..., 1:] - ref_losses[..., :1]
    d_eng = out64[..., 1:k] - out64[..., :1]
    max_diff = float((d_ref - d_eng).abs().max())
    # what float32 costs: its loss differences against float64's (same engine, same runs)
    d32 = (out32[..., 1:] - out32[..., :1]).double()
    d64 = out64[..., 1:] - out64[..., :1]
    cos = torch.nn.functional.cosine_similarity(d32[-1], d64[-1], dim=-1)  # per test instance, over left-out runs
    res |= {"f32_vs_f64_max_abs_diff": float((d32 - d64).abs().max()),
            "f64_loss_difference_rms": float(d64.pow(2).mean().sqrt()),
            "f32_vs_f64_cosine_mean": float(cos.mean()), "f32_vs_f64_cosine_min": float(cos.min())}
    print(f"float32 vs float64 loss differences: max |error| {res['f32_vs_f64_max_abs_diff']:.2e} vs rms difference "
          f"{res['f64_loss_difference_rms']:.2e}; cosine per test instance mean {res['f32_vs_f64_cosine_mean']:.4f}, "
          f"min {res['f32_vs_f64_cosine_min']:.4f}")
    flops = engine_matmul_flops_per_run_epoch(stacked.sparse)
    frac = flops / (eng32 / 1e3) / 1e9 / peak
    paper_hours = 100 * 101 * 25 * eng32 / 1e3 / 3600
    paper_hours_ref = 100 * 101 * 25 * ref32 / 1e3 / 3600
    res |= {"reference_f32_ms_per_run_epoch": ref32, "engine_f32_ms_per_run_epoch": eng32,
            "engine_f64_ms_per_run_epoch": eng64, "reference_f64_ms_per_run_epoch": ref64,
            "speedup_f32": ref32 / eng32, "speedup_f64_engine_vs_f32_reference": ref32 / eng64,
            "matmul_peak_fraction": frac, "gemm_f32_gflops": peak, "max_abs_diff_f64": max_diff,
            "max_abs_loss_difference_f64": float(d_ref.abs().max()),
            "projected_paper_hours_engine_f32": paper_hours,
            "projected_paper_hours_engine_f64": paper_hours * eng64 / eng32,
            "projected_paper_hours_reference_f32": paper_hours_ref}
    print(f"speedup float32: {ref32 / eng32:.1f}x; float64 engine vs float32 reference: {ref32 / eng64:.1f}x")
    print(f"engine matmul rate: {frac:.1%} of this machine's float32 GEMM peak")
    print(f"max |engine - reference| on loss differences (float64): {max_diff:.2e} "
          f"(differences themselves up to {float(d_ref.abs().max()):.2e})")
    print(f"paper's Folktables gold standard (100 seeds x 101 runs x 25 epochs): engine float32 {paper_hours:.1f} h, "
          f"float64 {paper_hours * eng64 / eng32:.1f} h; reference float32 {paper_hours_ref:.1f} h (one process)")
    if not args.no_shapes:
        shape_benchmarks(args, res)
        for name, r in res["shapes"].items():
            print(f"{name}: {r}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
