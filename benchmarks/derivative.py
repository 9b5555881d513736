"""The derivative gold standard (issue 16) against the difference gold standard.

    python -m benchmarks.derivative [--out FILE] [--rows 30085] [--epochs 1] [--optimizers sgd,adam]
                                    [--instances 100] [--no-reverse] [--threads N]

Folktables-shaped synthetic problem (benchmarks/further_training.py `folktables_like`: 791 inputs,
10 non-zeros per row, MLP 791-128-128-2, batch 128, 100 test instances), `mask` normalisation,
the paper's further-training optimizers (conf/experiment/folktables_{sgd,adam}.yaml: SGD lr 1e-4,
Adam lr 1e-6). Per optimizer:

- forward_vs_difference: ms per seed-epoch for `--instances` instances, forward mode
  (tda.further_training.derivative, Linear/ReLU fast path) vs the stacked difference engine
  (GroupTrainer: the full run + one run per instance, as `FurtherTraining` runs a seed); `ratio`
  compares the same dtype (float32), `ratio_f64` float64 with float64;
- reverse_per_entry_speedup: reverse mode for every training instance at the last checkpoint
  (float32) vs the difference engine's cost for the same n_train × n_test entries projected from
  its float32 ms per run-epoch ((n_train + 1) runs); `max_abs_vs_forward` checks it against
  forward mode on the chosen instances;
- float32_agreement: the float32 derivative against the float64 derivative, and the float32
  difference against the float64 difference (same engine, same runs), at the last checkpoint:
  mean / min cosine per test instance over the instances, and the fraction of entries whose
  sign differs.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from benchmarks.further_training import BATCH, N_IN, N_TEST, N_TRAIN, _loadavg, engine_ms, folktables_like
from tda.further_training.derivative import WeightedTrajectory
from tda.further_training.settings import FurtherTrainingSettings
from tda.models.mlp import MLP

OPTIMIZERS = {"sgd": {"_target_": "torch.optim.SGD", "lr": 1e-4},
              "adam": {"_target_": "torch.optim.Adam", "lr": 1e-6}}


def agreement(approx: torch.Tensor, truth: torch.Tensor) -> dict:
    """[n_test, n_instances] against the float64 truth: cosine per test instance, wrong signs."""
    cos = torch.nn.functional.cosine_similarity(approx.double(), truth.double(), dim=-1)
    wrong = (torch.sign(approx.double()) != torch.sign(truth.double())).double().mean()
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "wrong_signs": float(wrong)}


def one_optimizer(name, model, x, y, xt, yt, instances, epochs, reverse: bool) -> dict:
    opt = OPTIMIZERS[name]
    settings = FurtherTrainingSettings(epochs=epochs, batch_size=BATCH, removal="mask")
    R = 1 + len(instances)
    out: dict = {"optimizer": opt}
    timings = {}
    results = {}
    for dtype in (torch.float32, torch.float64):
        tag = "f32" if dtype == torch.float32 else "f64"
        m, xd, xtd = model.to(dtype), x.to(dtype), xt.to(dtype)
        # difference engine: the full run + one `mask` run per instance, stacked
        ms_run, losses, _ = engine_ms(m, opt, xd, y, xtd, yt, instances, epochs=epochs, removal="mask")
        timings[f"difference_{tag}_ms"] = ms_run * R  # per seed-epoch
        timings[f"difference_{tag}_ms_per_run_epoch"] = ms_run
        results[f"difference_{tag}"] = (losses[..., 1:] - losses[..., :1])[-1]
        traj = WeightedTrajectory(m, opt, xd, y, xtd, yt, "classification", settings, 0)
        t = time.perf_counter()
        fw = traj.forward_mode(instances, chunk=len(instances))
        timings[f"forward_{tag}_ms"] = (time.perf_counter() - t) * 1e3 / epochs
        results[f"derivative_{tag}"] = fw.derivative[-1]
        out[f"forward_plan_{tag}"] = fw.plan
        print(f"[{name}] {tag}: difference {timings[f'difference_{tag}_ms']:.0f} ms, forward "
              f"{timings[f'forward_{tag}_ms']:.0f} ms per seed-epoch ({len(instances)} instances)", flush=True)
    out["forward_vs_difference"] = {
        "forward_ms": timings["forward_f32_ms"], "difference_ms": timings["difference_f32_ms"],
        "ratio": timings["forward_f32_ms"] / timings["difference_f32_ms"],
        "forward_f64_ms": timings["forward_f64_ms"], "difference_f64_ms": timings["difference_f64_ms"],
        "ratio_f64": timings["forward_f64_ms"] / timings["difference_f64_ms"],
        "instances": len(instances), "dtype": "float32 (ratio), float64 (ratio_f64)"}
    d32, d64 = agreement(results["derivative_f32"], results["derivative_f64"]), \
        agreement(results["difference_f32"], results["difference_f64"])
    out["float32_agreement"] = {"derivative_cosine": d32["cosine_mean"], "derivative_cosine_min": d32["cosine_min"],
                                "difference_cosine": d64["cosine_mean"], "difference_cosine_min": d64["cosine_min"],
                                "derivative_wrong_signs": d32["wrong_signs"],
                                "difference_wrong_signs": d64["wrong_signs"]}
    # how far the linearisation is from the finite removal (float64, same instances)
    lin = agreement(results["derivative_f64"], results["difference_f64"])
    out["derivative_vs_difference_f64"] = {"cosine_mean": lin["cosine_mean"], "cosine_min": lin["cosine_min"],
                                           "wrong_signs": lin["wrong_signs"]}
    print(f"[{name}] float32 vs float64: derivative cosine {d32['cosine_mean']:.6f} (min {d32['cosine_min']:.6f}, "
          f"wrong signs {d32['wrong_signs']:.4f}); difference cosine {d64['cosine_mean']:.6f} "
          f"(min {d64['cosine_min']:.6f}, wrong signs {d64['wrong_signs']:.4f})", flush=True)
    if reverse:
        m, xd, xtd = model.float(), x.float(), xt.float()
        traj = WeightedTrajectory(m, opt, xd, y, xtd, yt, "classification", settings, 0)
        t = time.perf_counter()
        rv = traj.reverse_mode(checkpoints=[len(traj.checkpoint_steps) - 1], memory_budget_mb=4096)
        reverse_s = time.perf_counter() - t
        projected = timings["difference_f32_ms_per_run_epoch"] * (len(x) + 1) * epochs / 1e3
        check = float((rv.derivative[0][:, instances].double() - results["derivative_f32"]).abs().max())
        out["reverse_per_entry_speedup"] = {
            "reverse_s": reverse_s, "difference_projected_s": projected, "speedup": projected / reverse_s,
            "entries": len(x) * len(xt), "dtype": "float32", "plan": rv.plan,
            "max_abs_vs_forward": check, "max_abs_forward": float(results["derivative_f32"].abs().max())}
        print(f"[{name}] reverse mode, all {len(x)} instances x {len(xt)} test: {reverse_s:.1f} s; difference engine "
              f"projected {projected:.1f} s; speedup {projected / reverse_s:.1f}x (vs forward: max |Δ| {check:.2e})",
              flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="write the figures as JSON")
    ap.add_argument("--rows", type=int, default=N_TRAIN, help="training rows (default: Folktables' 30,085)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--instances", type=int, default=100, help="instances of forward mode / the difference engine")
    ap.add_argument("--optimizers", default="sgd,adam")
    ap.add_argument("--no-reverse", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.rows
    x_all, y_all = folktables_like(n + N_TEST)
    x, y, xt, yt = x_all[:n], y_all[:n], x_all[n:], y_all[n:]
    torch.manual_seed(0)
    model = MLP([N_IN], 2, hidden=(128, 128))
    instances = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:args.instances].tolist()
    res: dict = {"problem": {"n_train": n, "n_inputs": N_IN, "nonzeros_per_row": 10, "hidden": [128, 128],
                             "batch_size": BATCH, "n_test": N_TEST, "epochs": args.epochs, "instances": len(instances),
                             "normalisation": "mask", "seed": 0},
                 "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                             "cpu": platform.processor(), "load_average_at_start": _loadavg()}}
    for name in args.optimizers.split(","):
        res[name] = one_optimizer(name, model, x, y, xt, yt, instances, args.epochs, not args.no_reverse)
    res["machine"]["load_average_at_end"] = _loadavg()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
