"""The tables of docs/results.md, "The derivative gold standard on the ACS excerpt", printed as
markdown from the files the evaluate stage wrote (run after the commands shown there):

    TDA_RUNS_DIR=runs python docs/results/derivative_tables.py

Each table names the evaluation directory it reads.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from hydra import compose, initialize_config_dir

from tda.further_training.store import further_training_key
from tda.resources import config_dir
from tda.runs import RunDir

ROOT = Path(__file__).resolve().parents[2]  # the tables name files relative to the repository
DERIVATIVE = ["further_training.estimator=derivative", "further_training.removal=mask"]
EPOCHS = (1, 5, 10, 25)
ALL = ["further_training.n_seeds=3", "further_training.epochs=5"]  # every training instance: a shorter run


def eval_dir(overrides: list[str]) -> Path:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=overrides)
    return RunDir.from_config(cfg).eval_dir(further_training_key(cfg))


def gold_agreement(experiment: str) -> str:
    d = eval_dir([f"experiment={experiment}", *DERIVATIVE] + (["further_training.n_seeds=5"] if "adam" in experiment
                                                                else []))
    df = pd.read_csv(d / "gold_agreement.csv")
    df = df[df.centered & df.x.isin(EPOCHS)]
    rows = [f"`{d.relative_to(ROOT)}/gold_agreement.csv` (centred; mean over the 100 test instances)", "",
            "| derivative (mask) vs | metric | " + " | ".join(f"epoch {e}" for e in EPOCHS) + " |",
            "|---|---|" + "---|" * len(EPOCHS)]
    for (sibling, metric), g in df.groupby(["sibling", "metric"], sort=False):
        values = g.set_index("x")["mean"]
        rows.append(f"| {sibling} | {metric} | " + " | ".join(f"{values.get(float(e), float('nan')):.4f}"
                                                           for e in EPOCHS) + " |")
    return "\n".join(rows)


def all_instances(experiment: str) -> str:
    d = eval_dir([f"experiment={experiment}", "selection.n_left_out=null", *ALL, *DERIVATIVE])
    summary = pd.read_csv(d / "summary.csv")
    summary = summary[summary.centered]
    rows = [f"`{d.relative_to(ROOT)}/summary.csv`, `topk.csv` (centred; 3 seeds, 5 epochs; 100 test instances; "
            f"precision@k = share of the gold standard's top k that the method's top k holds)", "",
            "| method | peak cosine | cosine, epoch 5 | Spearman, epoch 5 | top-10 helpful found | top-10 harmful "
            "found | top-100 helpful | top-100 harmful |", "|---|---|---|---|---|---|---|---|"]
    for _, r in summary.sort_values("cosine_last", ascending=False).iterrows():
        rows.append(f"| {r.method} | {r.peak_cosine:.3f} | {r.cosine_last:.3f} | {r.spearman_last:.3f} | "
                    f"{r.precision_at_10_helpful:.2f} | {r.precision_at_10_harmful:.2f} | "
                    f"{r.get('precision_at_100_helpful', float('nan')):.2f} | "
                    f"{r.get('precision_at_100_harmful', float('nan')):.2f} |")
    return "\n".join(rows)


def left_out_methods() -> str:
    """Peak cosine of each method against the derivative and the drop gold standard (50 left out)."""
    base = ["experiment=folktables_sgd_cpu"]
    a = pd.read_csv(eval_dir(base + DERIVATIVE) / "summary.csv")
    b = pd.read_csv(eval_dir(base) / "summary.csv")
    a, b = a[a.centered].set_index("method"), b[b.centered].set_index("method")
    rows = ["| method | peak cosine vs derivative (mask) | vs difference (drop) |", "|---|---|---|"]
    for m in a.index:
        rows.append(f"| {m} | {a.loc[m, 'peak_cosine']:.3f} | {b.loc[m, 'peak_cosine']:.3f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sections = [("SGD lr 1e-4: the derivative against the difference gold standards (50 left out)",
                 lambda: gold_agreement("folktables_sgd_cpu")),
                ("SGD lr 1e-4: every method against both gold standards (50 left out)", left_out_methods),
                ("SGD lr 1e-4: every method over all 4,145 training instances",
                 lambda: all_instances("folktables_sgd_cpu")),
                ("Adam lr 1e-6: the derivative against the difference gold standard (50 left out)",
                 lambda: gold_agreement("folktables_adam_cpu")),
                ("Adam lr 1e-6: every method over all 4,145 training instances",
                 lambda: all_instances("folktables_adam_cpu"))]
    for title, table in sections:
        try:
            print(f"### {title}\n\n{table()}\n")
        except FileNotFoundError as err:
            print(f"### {title}\n\n(not computed yet: {err})\n")
