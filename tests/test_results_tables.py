"""docs/results/tables.py, which prints the tables docs/results.md quotes: a table's numbers are
those of the evaluation's files, and --check / --refresh find and rewrite a quoted table that no
longer matches them, keeping (and naming) one whose evaluation is not on this machine."""

from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path

import pandas as pd
from helpers.config import compose_config

from tda.stages import evaluate

TABLES = Path(__file__).resolve().parents[1] / "docs" / "results" / "tables.py"


def _tables():
    spec = importlib.util.spec_from_file_location("results_tables", TABLES)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_quoted_table_is_checked_and_refreshed_against_its_files(pipeline, tiny, tmp_path, capsys):
    out = evaluate(compose_config("evaluate", tiny))
    tables = _tables()
    args = " ".join(shlex.quote(a) for a in tiny) + " -- similarity"
    table = tables.render(shlex.split(args))

    # the Grad-Dot cell of the first checkpoint is similarity.csv's centred cosine, as the page prints it
    curves = pd.read_csv(out / "similarity.csv")
    first = curves[(curves.method == "grad_dot") & (curves.metric == "cosine") & curves.centered
                   & (curves.checkpoint == curves.checkpoint.min())]
    row = next(line for line in table.splitlines() if line.startswith(f"| {first.x.item():g} |"))
    assert tables.fmt(first["mean"].item()) in row
    assert f"`runs/{out.parent.parent.name}/eval/{out.name}/similarity.csv`" in table  # named as the docs name it

    stale = table.replace(row, "| 0 | a number the files no longer give |")
    absent = "experiment=diabetes_cpu further_training.epochs=7 -- similarity"  # never run here
    page = tmp_path / "page.md"
    text = (f"Intro.\n\n<!-- tables.py {args} -->\n{stale}\n<!-- /tables.py -->\n\nBetween.\n\n"
            f"<!-- tables.py {absent} -->\n| typed | in |\n<!-- /tables.py -->\n")
    page.write_text(text)

    assert tables.refresh(page, check=True) == 1
    assert page.read_text() == text  # --check rewrites nothing
    printed = capsys.readouterr().out
    assert f"differs: {args}" in printed and f"kept (not re-run here): {absent}" in printed

    assert tables.refresh(page, check=False) == 1
    refreshed = page.read_text()
    assert f"<!-- tables.py {args} -->\n{table}\n<!-- /tables.py -->" in refreshed
    assert refreshed.startswith("Intro.") and "| typed | in |" in refreshed and "Between." in refreshed
    assert tables.refresh(page, check=True) == 0
