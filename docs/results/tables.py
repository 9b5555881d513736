"""Markdown tables for docs/results.md from the files one evaluation wrote (`eval/<key>/`), each
with a caption naming the file it reads and how many seeds, test and left-out instances and
checkpoints stand behind it. The overrides are those given to `evaluate.py`:

    TDA_RUNS_DIR=runs python docs/results/tables.py experiment=diabetes_cpu -- similarity seeds adjustment
    python docs/results/tables.py experiment=folktables_sgd_cpu further_training.epochs=178 \
        further_training.n_seeds=10 -- similarity --at 1 25 100 178

Tables: similarity (cosine per checkpoint, centred gold standard, `--at` checkpoints; `--metric`),
seeds (peak vs seeds averaged, the authors' definition), adjustment (adjusted vs unadjusted,
uncentred), contrast (the paper's two gold standards side by side: centred, eq. 13, against
eq. 17's subtraction of the full-data run uncentred, with no subtraction as a third column),
distance (‖θ_t − θ_start‖), class (class structure), retraining (further training vs
retraining), reliability (split-half), agreement (method vs method; `--methods`), solver (the
iterative solvers' records: damping, scale, residual), sorted (sorted-score profiles, the
paper's Figure 10, as numbers), examples (examples.md, the paper's Table 2; `--test` ids).

docs/results.md keeps each table it quotes between `<!-- tables.py <arguments> -->` and
`<!-- /tables.py -->`; `python docs/results/tables.py --check docs/results.md` prints every such
table again from the files and lists those that now differ (exit status 1) or whose evaluation
directory is absent, `--refresh` rewrites them.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

import pandas as pd
from hydra import compose, initialize_config_dir

from tda.artifacts import load_json
from tda.further_training.store import further_training_key
from tda.resources import config_dir
from tda.runs import RunDir


def eval_dir(overrides: list[str]) -> Path:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=overrides)
    return RunDir.from_config(cfg).eval_dir(further_training_key(cfg))


def shown(d: Path) -> Path:
    """An evaluation directory as the docs name it, `runs/<run>/eval/<key>`, wherever the runs are."""
    return Path("runs", *d.parts[-3:])


def fmt(v: float) -> str:
    return "—" if pd.isna(v) else f"{v:.3f}".replace("0.", ".", 1) if abs(v) < 1 else f"{v:.3f}"


def caption(d: Path, file: str, what: str) -> str:
    done = load_json(d / "evaluated.json")
    meta = load_json(Path(done["gold"]) / "meta.json")
    sim = pd.read_csv(d / "similarity.csv")
    return (f"`{shown(d)}/{file}`: {what}; {len(done['seeds'])} seeds, "
            f"{len(meta['test_indices'])} test x {len(meta['left_out_indices'])} left-out instances, "
            f"{sim.checkpoint.nunique()} checkpoints ({sim.x_name.iloc[0]} {sim.x.min():g}–{sim.x.max():g})")


def pick(df: pd.DataFrame, at: list[float] | None) -> list[float]:
    xs = sorted(df.x.unique())
    return xs if not at else [x for x in xs if x in at]


def pick_methods(labels, only: list[str] | None) -> list[str]:
    """The method labels present, in file order, or those of `only` that are present, in its order."""
    present = list(dict.fromkeys(labels))
    return present if not only else [m for m in only if m in present]


def similarity(d: Path, at: list[float] | None, metric: str, only: list[str] | None = None) -> str:
    df = pd.read_csv(d / "similarity.csv")
    df = df[df.centered & (df.metric == metric)]
    methods = pick_methods(df.method, only)
    xs = pick(df, at)
    x_name = df.x_name.iloc[0]
    rows = [caption(d, "similarity.csv", f"{metric}, centred gold standard, mean over test instances"), "",
            f"| {x_name} | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for x in xs:
        g = df[df.x == x].set_index("method")["mean"]
        rows.append(f"| {x:g} | " + " | ".join(fmt(g.get(m)) for m in methods) + " |")
    return "\n".join(rows)


def seeds(d: Path, metric: str, only: list[str] | None = None, uncentred: bool = False) -> str:
    """Peak against seeds averaged, the authors' definition; the centred gold standard (eq. 13),
    or with `uncentred` eq. 17's (the full-data run subtracted, not centred)."""
    df = pd.read_csv(d / "seed_windows.csv")
    df = df[(df.centered != uncentred) & (df.metric == metric) & (df.definition == "peak_of_mean_curve")]
    ks = sorted(df.n_seeds_averaged.unique())
    gold = "not centred (eq. 17)" if uncentred else "centred"
    rows = [caption(d, "seed_windows.csv", f"peak {metric} over checkpoints against seeds averaged K, the authors' "
                                           f"definition (peak of the window-averaged curve), gold standard {gold}"), "",
            "| method | " + " | ".join(f"K = {k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for m in pick_methods(df.method, only):
        v = df[df.method == m].set_index("n_seeds_averaged")["peak_mean"]
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


def contrast(d: Path, metric: str, only: list[str] | None = None) -> str:
    """The paper's adjustment contrast on the same runs: the centred gold standard (eq. 13, its
    main figures) against eq. 17's subtraction of the full-data run without centring (its
    other figure), and, as a third variant, no subtraction at all (loss(D∖j) − loss(θᶠ))."""
    sim = pd.read_csv(d / "similarity.csv")
    sim = sim[sim.centered & (sim.metric == metric)]
    adj = pd.read_csv(d / "adjustment.csv")
    adj = adj[adj.metric == metric]
    rows = [caption(d, "similarity.csv` and `adjustment.csv",
                    f"{metric}: eq. 13 = centred gold standard; eq. 17 = full-data run subtracted, not centred; "
                    f"none = neither; first / peak / last checkpoint"), "",
            "| method | eq. 13 first | eq. 17 first | eq. 13 peak | eq. 17 peak | eq. 13 last | eq. 17 last | "
            "none, peak |", "|---|---|---|---|---|---|---|---|"]
    for m in pick_methods(sim.method, only):
        c = sim[sim.method == m].sort_values("checkpoint")["mean"]
        a = adj[(adj.method == m) & adj.adjusted].sort_values("checkpoint")["mean"]
        u = adj[(adj.method == m) & ~adj.adjusted]["mean"]
        rows.append(f"| {m} | {fmt(c.iloc[0])} | {fmt(a.iloc[0])} | {fmt(c.max())} | {fmt(a.max())} | "
                    f"{fmt(c.iloc[-1])} | {fmt(a.iloc[-1])} | {fmt(u.max())} |")
    return "\n".join(rows)


def agreement(d: Path, methods: list[str] | None, metric: str) -> str:
    """Method against method (`agreement.csv`: per test instance, mean over test instances)."""
    df = pd.read_csv(d / "agreement.csv")
    df = df[df.metric == metric]
    names = methods or list(dict.fromkeys([*df.method_a, *df.method_b]))
    rows = [caption(d, "agreement.csv", f"{metric} between two methods' score vectors, mean over test instances"), "",
            "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for a in names:
        cells = []
        for b in names:
            hit = df[((df.method_a == a) & (df.method_b == b)) | ((df.method_a == b) & (df.method_b == a))]
            cells.append("1" if a == b else fmt(hit["mean"].iloc[0]) if len(hit) else "—")
        rows.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


SOLVER_KEYS = ["damping_multiple", "damping", "scale", "batch_size", "seed"]


def solver(d: Path, metric: str) -> str:
    """The methods of the evaluation that solve (C + λI)x = g iteratively (CG, LiSSA), one row
    each, from their records (`methods/<key>/record.json`: the multiple of λ₀, λ, LiSSA's scale
    (the one used), rows per step and seed; depth and repeat in the caption; LiSSA's Lanczos
    estimate of the largest eigenvalue of C + λI (the scale must exceed half of it); the relative residual
    ‖g − (C + λI)x‖/‖g‖ of the returned solutions, mean and max over columns), beside their
    agreement with the gold standard (similarity.csv: first, peak, last checkpoint) and with CG at
    the same λ (agreement.csv, mean over test instances)."""
    done = load_json(d / "evaluated.json")
    run = Path(done["run"])
    sim = pd.read_csv(d / "similarity.csv")
    sim = sim[sim.centered & (sim.metric == metric)]
    agr = pd.read_csv(d / "agreement.csv")
    agr = agr[agr.metric == metric]
    solvers = {}
    for label, m in done["methods"].items():
        record = load_json(run / "methods" / m["key"] / "record.json")
        rec = {**record.get("config", {}), **record.get("extra", {})}  # what ran: the config, then what it chose
        if "cg" in rec or "relative_residual_max" in (rec.get("spectrum") or {}):
            solvers[label] = rec | {"method": record["method"]}
    cg_at = {rec["damping_multiple"]: label for label, rec in solvers.items() if rec["method"] == "cg"}
    depths = sorted({(r["depth"], r["repeat"]) for r in solvers.values() if "depth" in r})
    rows = [caption(d, "similarity.csv`, `agreement.csv` and the methods' `record.json",
                    f"{metric}; LiSSA depth / repeat {', '.join(f'{a} / {b}' for a, b in depths)}"), "",
            "| method | " + " | ".join(SOLVER_KEYS) + " | largest eigenvalue of C + λI | residual mean | "
            "residual max | with gold, first | with gold, peak | with gold, last | with CG at the same λ |",
            "|---|" + "---|" * (len(SOLVER_KEYS) + 7)]
    for label, rec in solvers.items():
        if "cg" in rec:
            r = pd.Series(rec["cg"]["relative_residual"], dtype=float)
            res = (r.mean(), r.max())
        else:
            res = (rec["spectrum"]["relative_residual_mean"], rec["spectrum"]["relative_residual_max"])
        cells = [f"{rec[k]:.3g}" if isinstance(rec.get(k), float) else str(rec[k]) if k in rec else "—"
                 for k in SOLVER_KEYS]
        c = sim[sim.method == label].sort_values("checkpoint")["mean"]
        ref = cg_at.get(rec["damping_multiple"])
        pair = agr[((agr.method_a == label) & (agr.method_b == ref))
                   | ((agr.method_a == ref) & (agr.method_b == label))]
        with_cg = "1" if ref == label else fmt(pair["mean"].iloc[0]) if len(pair) else "—"
        top = (rec.get("spectrum") or {}).get("lanczos_max")  # LiSSA's Lanczos estimate; CG records none
        rows.append(f"| {label} | " + " | ".join(cells) + f" | {'—' if top is None else f'{top:.3g}'} | "
                    + " | ".join(f"{v:.2g}" for v in res)
                    + f" | {fmt(c.iloc[0])} | {fmt(c.max())} | {fmt(c.iloc[-1])} | {with_cg} |")
    return "\n".join(rows)


def sorted_profiles(d: Path, only: list[str] | None = None) -> str:
    """The sorted-score profiles (sorted_scores.csv; the paper's Figure 10): each test
    instance's scores sorted, averaged over test instances, L2-normalised; a few ranks, and
    each profile's cosine with the centred gold standard's profile at its first and last
    checkpoint shown (how well the method reproduces the shape of the attribution)."""
    df = pd.read_csv(d / "sorted_scores.csv")
    gold = df[(df.source == "gold standard") & (df.centered == True)]  # noqa: E712 (methods: NaN)
    n = int(df["rank"].max())
    ranks = sorted({1, 2, 3, (n + 1) // 2, n - 2, n - 1, n})
    cps = sorted(gold.checkpoint.unique())
    ref = {t: gold[gold.checkpoint == t].sort_values("rank")["value"].to_numpy() for t in (cps[0], cps[-1])}
    x = {t: gold[gold.checkpoint == t].x.iloc[0] for t in cps}
    rows = [caption(d, "sorted_scores.csv", "sorted-score profiles (unit norm); the gold standard centred"), "",
            "| profile | " + " | ".join(f"rank {r}" for r in ranks)
            + f" | cosine with gold at {x[cps[0]]:g} | cosine with gold at {x[cps[-1]]:g} |",
            "|---|" + "---|" * (len(ranks) + 2)]
    series = [(f"gold standard, {x[t]:g}", gold[gold.checkpoint == t]) for t in cps]
    series += [(m, df[df.source == m]) for m in pick_methods(df[df.source != "gold standard"].source, only)]
    for name, g in series:
        v = g.sort_values("rank")["value"].to_numpy()
        cos = [float(v @ r) for r in ref.values()]  # both unit norm
        rows.append(f"| {name} | " + " | ".join(f"{v[r - 1]:+.3f}" for r in ranks) + " | "
                    + " | ".join(fmt(c) for c in cos) + " |")
    return "\n".join(rows)


def examples_md(d: Path, tests: list[int] | None, methods: list[str] | None) -> str:
    """examples.md (the evaluate stage's rendering of the most helpful and harmful left-out
    instances, the paper's Table 2), whole or only the sections of the given test ids; with
    `methods`, only those methods' ranks (`<method>:rank`, 1 = its most helpful) are kept."""
    text = (d / "examples.md").read_text()
    head, *sections = text.split("\n## Test instance ")
    keep = [s for s in sections if tests is None or int(s.split(" ", 1)[0]) in tests]
    where = shown(d)
    # results.md's own headings outline the page: examples.md's title and its per-test-instance
    # headings become a caption and bold lines
    head = "\n".join(line for line in head.splitlines() if not line.startswith("# "))
    body = "\n".join("\n" + re.sub(r"^(.*?)\n", r"**Test instance \1**\n", s.strip(), count=1) for s in keep)
    # an image beside examples.md is named by its path, since the page quoting the table lies elsewhere
    body = IMAGE.sub(lambda m: f"({m[1]}: `{where}/{m[2]}`)", body)
    if methods:
        body = "\n".join(_drop_columns(body.splitlines(), methods))
        head = OVERLAP.sub(lambda m: "; ".join(f"{name} {h} / {b}" for name, h, b in OVERLAP_ITEM.findall(m[1])
                                                if name in methods) + ".", head)
    return "\n".join([f"`{where}/examples.md`:", "", head.strip(), body])


IMAGE = re.compile(r"^!\[(.*?)\]\((.*?)\)$", re.M)  # examples.md's figure of a test instance's examples
OVERLAP = re.compile(r"(?<=\(helpful / harmful\): )(.*)$", re.M)  # examples.md's list of every method's overlap
OVERLAP_ITEM = re.compile(r"(\S+) (\d\.\d+) / (\d\.\d+)")
CELL = re.compile(r"(?<!\\)\|")  # a cell border: a | that md_escape did not escape


def _drop_columns(lines: list[str], methods: list[str]) -> list[str]:
    """Markdown table lines with, of the per-method columns, only the ranks of `methods`."""
    out, keep = [], None
    for line in lines:
        if not line.startswith("|"):
            out.append(line)
            keep = None
            continue
        cells = CELL.split(line)[1:-1]
        if keep is None:  # the header
            keep = [":" not in c or (c.strip().split(":")[0] in methods and c.strip().endswith(":rank")) for c in cells]
        out.append("|" + "|".join(c for c, k in zip(cells, keep) if k) + "|")
    return out


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
    """Split-half reliability of the gold standard, centred (eq. 13) and not (eq. 17)."""
    df = pd.read_csv(d / "reliability.csv")
    df = df[df.metric == metric]
    k, p = int(df.seeds_per_half.iloc[0]), int(df.projected_seeds.iloc[0])
    rows = [caption(d, "reliability.csv", f"split-half {metric} of the gold standard, centred (eq. 13) and not "
                                          f"(eq. 17)"), "",
            f"| {df.x_name.iloc[0]} | {k} vs {k} seeds, centred | projected to {p} seeds | {k} vs {k} seeds, "
            f"not centred | projected to {p} seeds |", "|---|---|---|---|---|"]
    for x in pick(df[df.centered], at):
        c, u = (df[(df.x == x) & (df.centered == centred)].iloc[0] for centred in (True, False))
        rows.append(f"| {x:g} | {fmt(c['mean'])} | {fmt(c['projected'])} | {fmt(u['mean'])} | {fmt(u['projected'])} |")
    return "\n".join(rows)


def render(argv: list[str]) -> str:
    """The tables `argv` asks for (`<evaluate overrides> -- <tables> [options]`), as markdown."""
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tables", nargs="+", choices=["similarity", "seeds", "adjustment", "contrast", "distance",
                                                      "class", "retraining", "reliability", "agreement", "solver",
                                                      "sorted", "examples"])
    parser.add_argument("--at", nargs="*", type=float, help="checkpoints (x values) to show; default: all")
    parser.add_argument("--metric", default="cosine", choices=["cosine", "spearman"])
    parser.add_argument("--methods", nargs="*", help="the methods (labels) to show, in this order (similarity, "
                        "seeds, contrast, agreement, sorted, examples); default: all")
    parser.add_argument("--uncentred", action="store_true", help="seeds: eq. 17's gold standard (not centred)")
    parser.add_argument("--test", nargs="*", type=int, help="examples: test instance ids to show; default: all")
    args = parser.parse_args(argv[split + 1:])
    d = eval_dir(argv[:split])
    return "\n\n".join({"similarity": lambda: similarity(d, args.at, args.metric, args.methods),
                         "seeds": lambda: seeds(d, args.metric, args.methods, args.uncentred),
                         "adjustment": lambda: adjustment(d, args.metric), "distance": lambda: distance(d, args.at),
                         "class": lambda: class_structure(d, args.at), "retraining": lambda: retraining(d, args.metric),
                         "reliability": lambda: reliability(d, args.at, args.metric),
                         "contrast": lambda: contrast(d, args.metric, args.methods),
                         "agreement": lambda: agreement(d, args.methods, args.metric),
                         "solver": lambda: solver(d, args.metric), "sorted": lambda: sorted_profiles(d, args.methods),
                         "examples": lambda: examples_md(d, args.test, args.methods)}[table]()
                        for table in args.tables)


# a block of a page that this script wrote: its arguments, then its output, then the closing marker
BLOCK = re.compile(r"^<!-- tables\.py (.+?) -->\n(.*?)^<!-- /tables\.py -->$", re.M | re.S)


def refresh(page: Path, check: bool) -> int:
    """Every block of `page` between `<!-- tables.py ARGS -->` and `<!-- /tables.py -->` printed
    again from its ARGS (shell-quoted as on the command line). Rewrites the page, or with `check`
    only lists the blocks whose files now print something else. Blocks whose evaluation directory
    is absent are kept as they are and listed. Returns the number of blocks that differ."""
    text, differ, absent = page.read_text(), [], []

    def again(m: re.Match) -> str:
        try:
            out = render(shlex.split(m[1]))
        except FileNotFoundError as e:
            absent.append(f"{m[1]}: {e.filename} is absent")
            return m[0]
        if out.strip() != m[2].strip():
            differ.append(m[1])
        return f"<!-- tables.py {m[1]} -->\n{out.strip()}\n<!-- /tables.py -->"

    new = BLOCK.sub(again, text)
    for line in absent:
        print(f"kept (not re-run here): {line}")
    for line in differ:
        print(f"{'differs' if check else 'updated'}: {line}")
    if not check and new != text:
        page.write_text(new)
    n = len(BLOCK.findall(text))
    print(f"{page}: {n} tables, {n - len(differ) - len(absent)} as their files print them, "
          f"{len(differ)} {'differ' if check else 'updated'}, {len(absent)} kept (evaluation absent)")
    return len(differ)


def main() -> None:
    argv = sys.argv[1:]
    if argv and argv[0] in ("--refresh", "--check"):
        if len(argv) != 2:
            sys.exit(f"usage: tables.py {argv[0]} <page.md>")
        sys.exit(1 if refresh(Path(argv[1]), check=argv[0] == "--check") and argv[0] == "--check" else 0)
    print(render(argv), end="\n\n")


if __name__ == "__main__":
    main()
