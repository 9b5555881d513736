"""The image run of docs/results.md: ResNet-9 on the 5,000 local CIFAR-10 images, every stage,
on one lent GPU inside a fixed time budget.

    TDA_DATA_DIR=../shared/data python docs/results/cifar10_gpu.py --budget 500 --out results_dir
    # complete an earlier run (no probes; only some methods):
    TDA_DATA_DIR=../shared/data python docs/results/cifar10_gpu.py --budget 120 --n-seeds 5 --methods arnoldi

It runs the same stage functions as `train.py`, `attribute.py` and `evaluate.py` (composed
from the same overrides, printed as the equivalent commands) in one process, so that imports
and data loading are paid once. The number of further-training seeds is the one thing chosen
at run time: two one-seed, one-epoch probes time the engine with `vmap` on and off, and the
seeds that fit the remaining budget (at most 20) are computed with the faster one. Every step
is guarded: a failing or overrunning step is recorded in `summary.json` and the rest go on.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import signal
import time
import traceback
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from tda.artifacts import load_json, load_tensor_metadata
from tda.resources import config_dir
from tda.runs import RunDir
from tda.stages import attribute, evaluate, train

EPOCHS = 4
BASE = ["experiment=cifar10", "logger=none", "trainer.progress_bar=false", "attribution.memory_budget_mb=80000",
        "selection.n_left_out=50", f"further_training.epochs={EPOCHS}", "further_training.checkpoint_every_steps=16"]
PROBE = ["further_training.n_seeds=1", "further_training.epochs=1"]
# cheapest first, so that an overrun costs the most expensive methods; ekfac's eigenvalue
# correction holds [batch, classes, d_out, d_in] float64 per conv layer: small batches
METHODS = [("grad_dot", []), ("grad_cos", []), ("datainf", []), ("kfac", []), ("ekfac", ["method.batch_size=64"]),
           ("arnoldi", []), ("trak", ["method.proj_dim=1024"]), ("cg", ["method.maxiter=10", "method.batch_size=32"])]
RESERVE_S = {"methods": 180, "evaluate": 40}


class OverrunError(Exception):
    pass


def _alarm(_signum, _frame):
    raise OverrunError("step exceeded its time limit")


def config(stage: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name=stage, overrides=overrides)


class Driver:
    def __init__(self, budget_s: float, out: Path):
        self.t0, self.deadline, self.out = time.time(), time.time() + budget_s, out
        self.steps: list[dict] = []
        signal.signal(signal.SIGALRM, _alarm)

    def left(self) -> float:
        return self.deadline - time.time()

    def step(self, label: str, stage: str, overrides: list[str], limit_s: float):
        """Run one stage with a time limit; returns its result or None. The equivalent command
        is recorded."""
        limit = int(min(limit_s, self.left()))
        entry = {"step": label, "command": f"python {stage}.py " + " ".join(overrides), "limit_s": limit}
        self.steps.append(entry)
        print(f"[{time.time() - self.t0:6.1f}s] {entry['command']}  (limit {limit}s)", flush=True)
        if limit < 5:
            entry["status"] = "skipped: no time left"
            return None
        fn = {"train": train, "attribute": attribute, "evaluate": evaluate}[stage]
        t = time.time()
        signal.alarm(limit)
        try:
            result = fn(config(stage, overrides))
            entry["status"] = "ok"
            return result
        except BaseException as err:  # noqa: BLE001 - every step is guarded: recorded, and the rest go on
            entry["status"] = f"failed: {type(err).__name__}: {err}"
            entry["traceback"] = traceback.format_exc(limit=8)
            print(entry["traceback"], flush=True)
            return None
        finally:
            signal.alarm(0)
            torch.use_deterministic_algorithms(False)  # as a fresh process of the next command starts
            entry["seconds"] = round(time.time() - t, 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.save()

    def save(self, **extra) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        summary = {"steps": self.steps, "elapsed_s": round(time.time() - self.t0, 1),
                   "machine": {"torch": torch.__version__, "python": platform.python_version(),
                               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                               "cpu_threads": torch.get_num_threads()}, **extra}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))


def probe_seconds(gold_dir) -> float | None:
    if gold_dir is None:
        return None
    return float(load_tensor_metadata(Path(gold_dir) / "seed_00000.safetensors")["seconds"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=520.0, help="seconds for the whole run")
    ap.add_argument("--out", type=Path, default=Path("cifar10_gpu"))
    ap.add_argument("--max-seeds", type=int, default=20)
    ap.add_argument("--n-seeds", type=int, default=None, help="skip the probes: this many seeds (completing a run)")
    ap.add_argument("--methods", default=None, help="comma-separated subset of the methods")
    ap.add_argument("--extra", nargs="*", default=[], help="more overrides for every stage (e.g. a smoke test)")
    args = ap.parse_args()
    base = BASE + args.extra
    d = Driver(args.budget, args.out)
    d.step("final model", "train", base, 240)
    t_vmap = t_loop = None
    if args.n_seeds:  # a re-run that completes an earlier one: no probes
        vmap, n_seeds = "true", args.n_seeds
    else:
        gold = base + PROBE + ["method=further_training"]
        vmap_gold = d.step("probe vmap", "attribute", gold + ["further_training.vmap=true"], 120)
        # a different checkpoint interval gives the second probe its own gold-standard directory
        loop_gold = d.step("probe loop", "attribute",
                           gold + ["further_training.vmap=false", "further_training.checkpoint_every_steps=32"], 120)
        t_vmap, t_loop = probe_seconds(vmap_gold), probe_seconds(loop_gold)
        timed = {k: v for k, v in {"true": t_vmap, "false": t_loop}.items() if v is not None}
        if not timed:
            d.save(error="both further-training probes failed")
            return
        vmap = min(timed, key=timed.get)
        ft_budget = d.left() - sum(RESERVE_S.values())
        n_seeds = max(1, min(args.max_seeds, math.floor(ft_budget / (1.1 * EPOCHS * timed[vmap]))))
    seeds = [f"further_training.n_seeds={n_seeds}"]
    d.save(probe_seconds_per_seed_epoch={"vmap": t_vmap, "loop": t_loop}, vmap=vmap, n_seeds=n_seeds)
    d.step("gold standard", "attribute", base + seeds + ["method=further_training", f"further_training.vmap={vmap}"],
           max((d.left() - sum(RESERVE_S.values())) * 1.15, 60))
    for name, extra in METHODS:
        if args.methods and name not in args.methods.split(","):
            continue
        d.step(name, "attribute", base + seeds + [f"method={name}", *extra], max(d.left() - RESERVE_S["evaluate"], 5))
    eval_dir = d.step("evaluate", "evaluate", base + seeds, RESERVE_S["evaluate"] + 60)
    run = RunDir.from_config(config("train", base))
    extra = {"probe_seconds_per_seed_epoch": {"vmap": t_vmap, "loop": t_loop}, "vmap": vmap, "n_seeds": n_seeds,
             "run_dir": str(run.path), "eval_dir": str(eval_dir) if eval_dir else None}
    if (run.path / "metrics.json").is_file():
        extra["final_model_metrics"] = load_json(run.path / "metrics.json")
    methods = {}
    for rec in sorted(run.path.glob("methods/*/record.json")):
        r = load_json(rec)
        methods[r["key"]] = {"seconds": r["seconds"], "peak_mb": r["peak_mb"], "config": r["config"]}
    extra["methods"] = methods
    d.save(**extra)
    print(json.dumps({k: v for k, v in extra.items() if k != "methods"}, indent=2, default=str))


if __name__ == "__main__":
    main()
