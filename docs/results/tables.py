"""Markdown tables for docs/results.md from the files one evaluation wrote (`eval/<key>/`), each
with a caption naming the file it reads and how many seeds, test and left-out instances and
checkpoints stand behind it. The overrides are those given to `evaluate.py`:

    TDA_RUNS_DIR=runs python docs/results/tables.py experiment=diabetes_cpu -- similarity seeds adjustment
    python docs/results/tables.py experiment=folktables_sgd_cpu further_training.epochs=178 \
        further_training.n_seeds=10 -- similarity --at 1 25 100 178

Tables: similarity (cosine per checkpoint, centred gold standard, `--at` checkpoints; `--metric`),
seeds (peak vs seeds averaged, the authors' definition), adjustment (adjusted vs unadjusted,
uncentred), distance (‖θ_t − θ_start‖), class (class structure), retraining (further training
vs retraining), reliability (split-half).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
from hydra import compose, initialize_config_dir

from tda.artifacts import load_json
from tda.further_training.store import further_training_key
from tda.resources import config_dir
from tda.runs import RunDir

ROOT = Path(__file__).resolve().parents[2]  # the tables name files relative to the repository

def eval_dir(overrides: list[str]) -> Path:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=overrides)
    return RunDir.from_config(cfg).eval_dir(further_training_key(cfg))


def fmt(v: float) -> str:
    return "—" if pd.isna(v) else f"{v:.3f}".replace("0.", ".", 1) if abs(v) < 1 else f"{v:.3f}"


def caption(d: Path, file: str, what: str) -> str:
    done = load_json(d / "evaluated.json")
    meta = load_json(Path(done["gold"]) / "meta.json")
    sim = pd.read_csv(d / "similarity.csv")
    return (f"`{d.relative_to(ROOT) if d.is_relative_to(ROOT) else d}/{file}`: {what}; {len(done['seeds'])} seeds, "
            f"{len(meta['test_indices'])} test x {len(meta['left_out_indices'])} left-out instances, "
            f"{sim.checkpoint.nunique()} checkpoints ({sim.x_name.iloc[0]} {sim.x.min():g}–{sim.x.max():g})")


def pick(df: pd.DataFrame, at: list[float] | None) -> list[float]:
    xs = sorted(df.x.unique())
    return xs if not at else [x for x in xs if x in at]


def similarity(d: Path, at: list[float] | None, metric: str) -> str:
    df = pd.read_csv(d / "similarity.csv")
    df = df[df.centered & (df.metric == metric)]
    methods = list(dict.fromkeys(df.method))
    xs = pick(df, at)
    x_name = df.x_name.iloc[0]
    rows = [caption(d, "similarity.csv", f"{metric}, centred gold standard, mean over test instances"), "",
            f"| {x_name} | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for x in xs:
        g = df[df.x == x].set_index("method")["mean"]
        rows.append(f"| {x:g} | " + " | ".join(fmt(g.get(m)) for m in methods) + " |")
    return "\n".join(rows)


def seeds(d: Path, metric: str) -> str:
    df = pd.read_csv(d / "seed_windows.csv")
    df = df[df.centered & (df.metric == metric) & (df.definition == "peak_of_mean_curve")]
    ks = sorted(df.n_seeds_averaged.unique())
    rows = [caption(d, "seed_windows.csv", f"peak {metric} over checkpoints against seeds averaged K, the authors' "
                                           f"definition (peak of the window-averaged curve), centred"), "",
            "| method | " + " | ".join(f"K = {k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for m, g in df.groupby("method", sort=False):
        v = g.set_index("n_seeds_averaged")["peak_mean"]
        rows.append(f"| {m} | " + " | ".join(fmt(v.get(k)) for k in ks) + " |")
    return "\n".join(rows)


def adjustment(d: Path, metric: str) -> str:
    df = pd.read_csv(d / "adjustment.csv")
    df = df[df.metric == metric]
    rows = [caption(d, "adjustment.csv", f"{metric} against the uncentred gold standard with (eq. 17) and without "
                                         f"the subtraction of the full-data run: at the last checkpoint and the "
                                         f"peak over checkpoints"), "",
            "| method | adjusted, last | unadjusted, last | adjusted, peak | unadjusted, peak |",
            "|---|---|---|---|---|"]
    for m, g in df.groupby("method", sort=False):
        a, u = g[g.adjusted].sort_values("checkpoint"), g[~g.adjusted].sort_values("checkpoint")
        rows.append(f"| {m} | {fmt(a['mean'].iloc[-1])} | {fmt(u['mean'].iloc[-1])} | {fmt(a['mean'].max())} | "
                    f"{fmt(u['mean'].max())} |")
    return "\n".join(rows)


def distance(d: Path, at: list[float] | None) -> str:
    df = pd.read_csv(d / "distance.csv")
    rows = [caption(d, "distance.csv", "‖θ_t − θ_start‖₂ of the full-data run, mean ± SE over seeds"), "",
            f"| {df.x_name.iloc[0]} | distance | SE |", "|---|---|---|"]
    for x in pick(df, at):
        r = df[df.x == x].iloc[0]
        rows.append(f"| {x:g} | {r['mean']:.4g} | {r['se']:.2g} |")
    return "\n".join(rows)


def class_structure(d: Path, at: list[float] | None) -> str:
    df = pd.read_csv(d / "class_structure.csv")
    gold = df.source == "gold standard"
    df = df[~gold | (df.centered == True)]  # noqa: E712 (the methods' rows hold no centring: NaN)
    rows = [caption(d, "class_structure.csv", "mean score of the test instance's own class and of the other classes, "
                                              "and the centred cosine with the same-class indicator"), "",
            "| scores | checkpoint | own class | other classes | cosine with same class |", "|---|---|---|---|---|"]
    for _, r in df.iterrows():
        if r["source"] == "gold standard" and at and r["x"] not in at:
            continue
        where = f"{r['x']:g}" if r["source"] == "gold standard" else "—"
        rows.append(f"| {r['source']} | {where} | {r['same_class']:.3g} | {r['other_class']:.3g} | "
                    f"{fmt(r['cosine_same_class'])} |")
    return "\n".join(rows)


def retraining(d: Path, metric: str) -> str:
    df = pd.read_csv(d / "further_vs_retraining.csv")
    df = df[df.centered & (df.metric == metric)]
    rows = [caption(d, "further_vs_retraining.csv", f"{metric} of each further-training gold standard with the "
                                                    f"retraining gold standard's last checkpoint, centred"), "",
            "| further training | first | peak | at | last |", "|---|---|---|---|---|"]
    for m, g in df.groupby("method", sort=False):
        g = g.sort_values("checkpoint")
        best = g.loc[g["mean"].idxmax()]
        rows.append(f"| {m} | {fmt(g['mean'].iloc[0])} | {fmt(best['mean'])} | {best['x_name']} {best['x']:g} | "
                    f"{fmt(g['mean'].iloc[-1])} |")
    return "\n".join(rows)


def reliability(d: Path, at: list[float] | None, metric: str) -> str:
    df = pd.read_csv(d / "reliability.csv")
    df = df[df.centered & (df.metric == metric)]
    k, p = int(df.seeds_per_half.iloc[0]), int(df.projected_seeds.iloc[0])
    rows = [caption(d, "reliability.csv", f"split-half {metric} of the centred gold standard"), "",
            f"| {df.x_name.iloc[0]} | {k} vs {k} seeds | projected to {p} seeds |", "|---|---|---|"]
    for x in pick(df, at):
        r = df[df.x == x].iloc[0]
        rows.append(f"| {x:g} | {fmt(r['mean'])} | {fmt(r['projected'])} |")
    return "\n".join(rows)


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tables", nargs="+", choices=["similarity", "seeds", "adjustment", "distance", "class",
                                                      "retraining", "reliability"])
    parser.add_argument("--at", nargs="*", type=float, help="checkpoints (x values) to show; default: all")
    parser.add_argument("--metric", default="cosine", choices=["cosine", "spearman"])
    args = parser.parse_args(argv[split + 1:])
    d = eval_dir(argv[:split])
    for table in args.tables:
        print({"similarity": lambda: similarity(d, args.at, args.metric), "seeds": lambda: seeds(d, args.metric),
               "adjustment": lambda: adjustment(d, args.metric), "distance": lambda: distance(d, args.at),
               "class": lambda: class_structure(d, args.at), "retraining": lambda: retraining(d, args.metric),
               "reliability": lambda: reliability(d, args.at, args.metric)}[table](), end="\n\n")


if __name__ == "__main__":
    main()
