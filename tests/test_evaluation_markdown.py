"""report.md (tda.evaluation.markdown) reads without the paper: named columns, centring said in
words, a glossary of its terms; the comparison report lists its experiments and explains its figure."""

from __future__ import annotations

import pandas as pd
from helpers.evaluation import reliability_frame

from tda.evaluation.curves import PEAK_COLUMNS
from tda.evaluation.markdown import compare_report, evaluation_report


def _summary(centered_values=(True, False)) -> pd.DataFrame:
    return pd.DataFrame([{"method": "grad_dot", "centered": c, "peak_cosine": 0.9, "peak_checkpoint": 1, "peak_x": 2.0,
                          "cosine_first": 0.8, "cosine_last": 0.85, "spearman_first": 0.7, "spearman_last": 0.75,
                          "spearman_skipped": 0, "seconds": 1.5, "peak_mb": 10.0} for c in centered_values])


def test_report_names_its_columns_and_explains_its_terms(tmp_path):
    peaks = pd.DataFrame([["grad_dot", "cosine", c, d, k, 2 // k, 0.9 if d == "peak_of_mean_curve" else 0.95, 0.01, 0,
                           "1"] for c in (True, False) for d in ("mean_of_window_peaks", "peak_of_mean_curve")
                          for k in (1, 2)], columns=PEAK_COLUMNS)
    agreement = pd.DataFrame([["grad_dot", "datainf", "cosine", 0.5, 0.1, 6, 0]],
                             columns=["method_a", "method_b", "metric", "mean", "se", "n", "n_skipped"])
    report = evaluation_report("t", "epoch", _summary(), reliability_frame(), peaks, agreement,
                               [tmp_path / "similarity.png"], ["summary.csv", "similarity.csv"], has_examples=False)
    tables = [line for line in report.splitlines() if line.startswith("|")]
    assert tables and not any(" True " in line or " False " in line for line in tables)  # centring said in words
    assert any("| centred |" in line for line in tables) and any("| not centred |" in line for line in tables)
    header = next(line for line in tables if line.startswith("| method | gold standard | peak cosine"))
    assert "peak epoch" in header and "Spearman undefined" in header and "method seconds" in header
    assert "| metric | gold standard | 2 vs 2 seeds | SE | projected to 4 seeds |" in report
    assert "(2 vs 2 seeds)" in report
    # both peak definitions, labelled, the authors' first
    assert "| method | gold standard | definition | K = 1 | K = 2 |" in report
    authors = "| grad_dot | centred | peak of the window-averaged curve (authors') | 0.9 | 0.9 |"
    ours = "| grad_dot | centred | mean of the windows' peaks | 0.95 | 0.95 |"
    assert authors in report and ours in report and report.index(authors) < report.index(ours)
    # no distance recorded: said once
    assert report.count("does not record ‖θ_t − θ_start‖") == 1
    glossary = report[report.index("## Glossary"):report.index("## Figures")]
    for term in ("**centred / not centred**", "`peak_x`", "`projected`", "**split-half reliability**",
                 "`peak_of_mean_curve`", "`mean_of_window_peaks`",
                 "**seeds averaged (K)**", "**mean over test instances**", "**cosine / Spearman**", "**SE**"):
        assert term in glossary, term
    assert "![similarity](similarity.png)" in report and "- [similarity.csv](similarity.csv)" in report


def test_comparison_report_lists_experiments_and_explains_the_figure(tmp_path):
    summary = _summary().assign(experiment="further_optimizer=adam")[["experiment", *_summary().columns]]
    report = compare_report("c", "step", {"further_optimizer=adam": ["/runs/a"]}, summary, tmp_path / "similarity.png",
                            ["similarity.csv"])
    assert "- `further_optimizer=adam`: `/runs/a`" in report
    assert "| experiment | method | gold standard | peak cosine | peak checkpoint | peak step |" in report
    assert "## Glossary" in report and "line style = experiment" in report
