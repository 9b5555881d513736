"""Issue 15: the evaluate stage's report and figures read without the paper (glossary, named
columns, integer epoch ticks, readable heatmap numbers, a comparison legend that covers no
curve), compare mode composes its experiments through Hydra, and every step is logged."""

from __future__ import annotations

import logging

import matplotlib.image
import pandas as pd
import pytest
from conftest import CONF, compose_config
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from matplotlib.colors import to_rgb

from tda.config import ConfigError
from tda.evaluation import plots
from tda.evaluation.compare import compose_experiment, running_app_overrides
from tda.evaluation.curves import CURVE_COLUMNS
from tda.evaluation.markdown import compare_report, evaluation_report
from tda.evaluation.progress import Steps


def _curves(methods=("grad_dot", "datainf"), xs=(1.0, 2.0, 3.0), experiment: str | None = None) -> pd.DataFrame:
    """similarity_curves-shaped rows with made-up means."""
    rows = [[m, metric, centered, t, x, "epoch", 0.5 + 0.1 * t, 0.05, 6, 0]
            for m in methods for metric in ("cosine", "spearman") for centered in (True, False)
            for t, x in enumerate(xs)]
    df = pd.DataFrame(rows, columns=CURVE_COLUMNS)
    return df if experiment is None else df.assign(experiment=experiment)


def _reliability(xs=(1.0, 2.0, 3.0)) -> pd.DataFrame:
    return pd.DataFrame([[metric, centered, t, x, "epoch", 0.9, 0.01, 6, 0, 2, 0.95]
                         for metric in ("cosine", "spearman") for centered in (True, False) for t, x in enumerate(xs)],
                        columns=["metric", "centered", "checkpoint", "x", "x_name", "mean", "se", "n", "n_skipped",
                                 "seeds_per_half", "ceiling_full"])


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plot functions draw, kept open instead of saved."""
    figs = []

    def keep(fig, path, title=""):
        fig.canvas.draw()
        figs.append(fig)
        return path

    monkeypatch.setattr(plots, "_save", keep)
    yield figs
    for fig in figs:
        plots.plt.close(fig)


# ------------------------------------------------------------------ report.md
def _summary(centered_values=(True, False)) -> pd.DataFrame:
    return pd.DataFrame([{"method": "grad_dot", "centered": c, "peak_cosine": 0.9, "peak_checkpoint": 1, "peak_x": 2.0,
                          "cosine_first": 0.8, "cosine_last": 0.85, "spearman_first": 0.7, "spearman_last": 0.75,
                          "spearman_skipped": 0, "seconds": 1.5, "peak_mb": 10.0} for c in centered_values])


def test_report_names_its_columns_and_explains_its_terms(tmp_path):
    peaks = pd.DataFrame([["grad_dot", "cosine", c, k, 2 // k, 0.9, 0.01, 0, "1"]
                          for c in (True, False) for k in (1, 2)],
                         columns=["method", "metric", "centered", "n_seeds_averaged", "n_windows", "peak_mean",
                                  "peak_se", "n_windows_undefined", "peak_checkpoints"])
    agreement = pd.DataFrame([["grad_dot", "datainf", "cosine", 0.5, 0.1, 6, 0]],
                             columns=["method_a", "method_b", "metric", "mean", "se", "n", "n_skipped"])
    report = evaluation_report("t", "epoch", _summary(), _reliability(), peaks, agreement,
                               [tmp_path / "similarity.png"], ["summary.csv", "similarity.csv"], has_examples=False)
    tables = [line for line in report.splitlines() if line.startswith("|")]
    assert tables and not any(" True " in line or " False " in line for line in tables)  # centring said in words
    assert any("| centred |" in line for line in tables) and any("| not centred |" in line for line in tables)
    header = next(line for line in tables if line.startswith("| method | gold standard | peak cosine"))
    assert "peak epoch" in header and "Spearman undefined" in header and "method seconds" in header
    assert "| metric | gold standard | mean | SE | projected to all seeds |" in report
    assert "| method | gold standard | K = 1 | K = 2 |" in report
    glossary = report[report.index("## Glossary"):report.index("## Figures")]
    for term in ("**centred / not centred**", "`peak_x`", "`ceiling_full`", "**split-half reliability**",
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


# ------------------------------------------------------------------ figures
def test_similarity_figure_has_whole_epoch_ticks_and_a_legend_beside_the_curves(drawn, tmp_path):
    plots.plot_curves(_curves(), tmp_path / "similarity.png", reliability=_reliability())
    fig = drawn[0]
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks == [1.0, 2.0, 3.0], ticks  # no 1.5 epochs
        assert ax.get_legend() is None
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["datainf", "grad_dot", "gold split-half (2 vs 2 seeds)"]
    _assert_covers_no_axes(fig, legend)


def test_comparison_legend_separates_colours_and_line_styles(drawn, tmp_path):
    curves = pd.concat([_curves(experiment="further_optimizer=sgd"), _curves(experiment="further_optimizer=adam")])
    plots.plot_curves(curves.assign(series=curves.experiment + " / " + curves.method), tmp_path / "similarity.png",
                      series="series", style_by="experiment")
    fig = drawn[0]
    (legend,) = fig.legends
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts == ["colour: method", "datainf", "grad_dot", "", "line style: experiment",
                     "further_optimizer=sgd", "further_optimizer=adam"]
    assert legend.handlelength >= 4  # long enough for a dash-dot pattern to show
    styles = [h.get_linestyle() for h, t in zip(legend.legend_handles, texts) if t.startswith("further_optimizer")]
    assert len(set(styles)) == 2
    _assert_covers_no_axes(fig, legend)


def _assert_covers_no_axes(fig, legend) -> None:
    box = legend.get_window_extent()
    for ax in fig.axes:
        assert not box.overlaps(ax.get_window_extent()), "the legend covers a plot"


def test_agreement_numbers_contrast_with_their_cell(drawn, tmp_path):
    methods = ["a", "b", "c", "d"]
    agreement = pd.DataFrame([[a, b, "cosine", v, 0.0, 6, 0] for (a, b), v in
                              zip([("a", "b"), ("a", "c"), ("a", "d"), ("b", "c"), ("b", "d"), ("c", "d")],
                                  [0.95, -0.95, 0.05, 0.1, -0.1, 0.0])],
                             columns=["method_a", "method_b", "metric", "mean", "se", "n", "n_skipped"])
    plots.plot_agreement(agreement, methods, tmp_path / "agreement.png")
    cells = {t.get_text(): to_rgb(t.get_color()) for t in drawn[0].axes[0].texts}
    white, black = (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)
    assert cells["1.00"] == white and cells["0.95"] == white and cells["-0.95"] == white  # dark blue / red
    assert cells["0.05"] == black and cells["0.00"] == black and cells["-0.10"] == black  # near white


def test_saved_figure_includes_the_outside_legend(tmp_path):
    path = plots.plot_curves(_curves(), tmp_path / "similarity.png", reliability=_reliability())
    width = matplotlib.image.imread(path).shape[1]
    assert width > 2 * 5.2 * 110 * 1.05  # the grid's width plus the legend's (110 dpi)


# ------------------------------------------------------------------ compare mode: Hydra's compose API
def test_inside_a_hydra_app_the_apps_overrides_and_config_search_path_are_used(tiny):
    app = tiny + ['evaluate.compare=["further_optimizer=adam"]']
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):  # as @hydra.main leaves GlobalHydra
        HydraConfig.instance().set_config(compose("evaluate", overrides=app, return_hydra_config=True))
        try:
            assert running_app_overrides() == app
            sub = compose_experiment(running_app_overrides(), "further_optimizer=adam further_training.epochs=4")
        finally:
            HydraConfig.instance().cfg = None
    assert sub.further_optimizer.name == "adam" and sub.further_training.epochs == 4
    assert sub.dataset.max_train == 96  # the app's own overrides came first
    with pytest.raises(ValueError, match="outside `python evaluate.py`"):
        running_app_overrides()


def test_an_entry_composes_like_the_command_line(tiny):
    """Later overrides win, as on the command line; a value set by the base survives a group swap."""
    sub = compose_experiment(tiny + ["further_optimizer=adam", "further_optimizer.lr=0.5"], "further_optimizer=sgd")
    assert sub.further_optimizer.name == "sgd" and sub.further_optimizer.lr == 0.5
    assert compose_experiment(tiny, "seed=3") == compose_config("evaluate", tiny + ["seed=3"])
    with pytest.raises(ConfigError, match="'further_optimizer=nadam'"):  # a user error: one line, exit 2
        compose_experiment(tiny, "further_optimizer=nadam")


# ------------------------------------------------------------------ progress
def test_every_step_is_logged_with_its_time(caplog):
    steps = Steps("evaluate")
    with caplog.at_level(logging.INFO, logger="tda.evaluation"):
        with steps.step("loading", "the gold standard"):
            pass
        with steps.step("seed windows"):
            pass
    assert [r.getMessage() for r in caplog.records] == ["evaluate: loading (the gold standard)",
                                                        "evaluate: seed windows"]
    assert list(steps.seconds) == ["loading", "seed windows"] and all(s >= 0 for s in steps.seconds.values())
    assert steps.timings().startswith(f"{sum(steps.seconds.values()):.1f} s (loading ")
