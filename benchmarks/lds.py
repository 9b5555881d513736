"""The retraining-LDS ground truth, tda's subset gold standard against dattri's retraining, side by
side in one run; and tda's LDS against dattri's `lds` metric on the same ground truth and scores.

    python -m benchmarks.lds [--out FILE] [--subsets 100] [--fraction 0.5]

Needs dattri (the `baselines` extra). The problem: the embedded breast-cancer data and the default
MLP (128-128), the whole training set scored (`selection.n_left_out=null`), its final-training
recipe (SGD lr 0.01, batch 32, 30 epochs), in a temporary runs directory:

- tda_s: the further_train stage with `gold_standard=retraining_subsets` (`--subsets` subsets
  keeping `--fraction` of the rows, one run each, from the final model's recorded initial weights,
  float32 as the final training), stacked runs; the stage's own loading included;
- dattri_s: `dattri.model_util.retrain.retrain_lds` with a training function written to the same
  recipe (the same initial weights, torch.optim.SGD, a shuffled DataLoader over the subset) and
  `dattri.metric.calculate_lds_ground_truth` with the same margin target (dattri negates what
  the target function returns, so it returns −margin);
- max_abs_diff: the largest difference between tda's LDS per method (the evaluate stage's
  lds.csv, last checkpoint) and the mean over test instances of `dattri.metric.lds` applied to
  the same ground truth (tda's) and scores (Grad-Dot, Grad-Cos, DataInf);
- lds_on_dattri_ground_truth: each method's LDS on dattri's ground truth, for context (its
  subsets and batch orders are its own).

What differs between the two trainings: the subsets (each draws its own) and the batch order
(tda's seeded sampler per run, dattri's DataLoader shuffle under its seed); nothing else: both
start from the same initial weights, in float32, with the same optimizer, epochs and batch size.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from hydra import compose, initialize_config_dir

from tda.artifacts import load_tensors
from tda.evaluation.lds import lds_per_test
from tda.further_training.store import further_training_key
from tda.further_training.subset_store import load_subset_gold_standard
from tda.further_training.subsets import kept_rows, margin
from tda.preflight import check_config
from tda.provenance import read_final_model, read_initial_model
from tda.resources import config_dir
from tda.runs import RunDir
from tda.stages import attribute, attribution_problem, evaluate, further_train, train

METHODS = ("grad_dot", "grad_cos", "datainf")


def config(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def dattri_ground_truth(problem, cfg, n_subsets: int, fraction: float, work: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(margins [n_subsets, n_test], indices [n_subsets, k]) from dattri's retraining."""
    from dattri.metric import calculate_lds_ground_truth  # noqa: PLC0415 - the baselines extra
    from dattri.model_util.retrain import retrain_lds  # noqa: PLC0415 - optional peer, imported where measured

    start = copy.deepcopy(problem.model).float()
    lr, epochs = float(cfg.optimizer.lr), int(cfg.train.epochs)

    def train_func(dataloader, seed=None, **kwargs):
        model = copy.deepcopy(start)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        model.train()
        for _ in range(epochs):
            for xb, yb in dataloader:
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(xb), yb).backward()
                opt.step()
        return model

    def target_func(ckpt_path, dataloader):
        model = copy.deepcopy(start)
        model.load_state_dict(torch.load(ckpt_path, weights_only=True))
        model.eval()
        with torch.no_grad():
            # dattri negates what its target function returns (it expects a loss): −margin gives the margin
            return -torch.cat([margin(model(xb), yb) for xb, yb in dataloader])

    train_set = torch.utils.data.TensorDataset(problem.x_train.float(), problem.y_train)
    test_set = torch.utils.data.TensorDataset(problem.x_test.float(), problem.y_test)
    loader = torch.utils.data.DataLoader(train_set, batch_size=int(cfg.train.batch_size), shuffle=True)
    retrain_lds(train_func, loader, str(work), num_subsets=n_subsets, subset_ratio=fraction, seed=0)
    return calculate_lds_ground_truth(target_func, str(work), torch.utils.data.DataLoader(test_set, batch_size=256))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--fraction", type=float, default=0.5)
    args = parser.parse_args()
    from dattri.metric import lds as dattri_lds  # noqa: PLC0415 - refused early without the baselines extra

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TDA_RUNS_DIR"] = str(Path(tmp) / "runs")
        base = ["selection.n_left_out=null", "logger=none", "trainer.progress_bar=false"]
        gold = [*base, "gold_standard=retraining_subsets", f"further_training.subsets.count={args.subsets}",
                f"further_training.subsets.fraction={args.fraction}", "further_training.dtype=float32"]
        run = train(config("train", base))
        for method in METHODS:
            attribute(config("attribute", [*base, f"method={method}"]))
        t0 = time.perf_counter()
        further_train(config("attribute", gold))
        tda_s = time.perf_counter() - t0
        out = evaluate(config("evaluate", gold))

        cfg = config("attribute", gold)
        settings = check_config(cfg, "attribute")
        run = RunDir.from_config(cfg, settings)
        final = read_final_model(run)
        problem = attribution_problem(cfg, settings, run, final=final, start_weights=read_initial_model(run, final))
        t0 = time.perf_counter()
        theirs, their_indices = dattri_ground_truth(problem, cfg, args.subsets, args.fraction, Path(tmp) / "dattri")
        dattri_s = time.perf_counter() - t0

        subset_gold = load_subset_gold_standard(run.gold_dir(further_training_key(cfg)))
        truth = subset_gold.target("margin")[-1]  # [n_test, m], the last checkpoint (the models trained in full)
        indices = kept_rows(subset_gold.masks)
        table = pd.read_csv(out / "lds.csv")
        rows, diffs = {}, []
        for d in run.method_dirs():
            scores = load_tensors(d / "scores.safetensors")["scores"].double()
            name = d.name.split("-")[0]
            ours = table[(table.method == name) & (table.metric == "lds_margin")].sort_values("checkpoint")
            ours_last = float(ours["mean"].iloc[-1])
            peer = float(dattri_lds(scores.T, (truth.T, indices))[0].nanmean())
            diffs.append(abs(ours_last - peer))
            on_theirs = lds_per_test(scores, _masks(their_indices, scores.shape[1]), theirs.T.double())
            rows[name] = {"tda_lds": ours_last, "dattri_lds_same_ground_truth": peer,
                          "lds_on_dattri_ground_truth": float(on_theirs.nanmean())}
    result = {"ground_truth_vs_dattri": {"tda_s": tda_s, "dattri_s": dattri_s, "speedup": dattri_s / tda_s,
                                         "max_abs_diff": max(diffs)},
              "methods": rows, "subsets": args.subsets, "fraction": args.fraction,
              "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(),
                          "loadavg": os.getloadavg()}}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


def _masks(indices: torch.Tensor, n_train: int) -> torch.Tensor:
    masks = torch.zeros(len(indices), n_train, dtype=torch.bool)
    masks[torch.arange(len(indices)).unsqueeze(1), indices.long()] = True
    return masks


if __name__ == "__main__":
    main()
