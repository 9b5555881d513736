"""The evaluate stage's figures (tda.evaluation.plots) read at a glance: whole-epoch ticks, a
legend beside the curves that covers none of them, colours and line styles told apart in a
comparison, heatmap numbers that contrast with their cell."""

from __future__ import annotations

import matplotlib.image
import pandas as pd
import pytest
from helpers.evaluation import reliability_frame
from matplotlib.colors import to_rgb

from tda.evaluation import plots
from tda.evaluation.curves import CURVE_COLUMNS


def _curves(methods=("grad_dot", "datainf"), xs=(1.0, 2.0, 3.0), experiment: str | None = None) -> pd.DataFrame:
    """similarity_curves-shaped rows with made-up means."""
    rows = [[m, metric, centered, t, x, "epoch", 0.5 + 0.1 * t, 0.05, 6, 0]
            for m in methods for metric in ("cosine", "spearman") for centered in (True, False)
            for t, x in enumerate(xs)]
    df = pd.DataFrame(rows, columns=CURVE_COLUMNS)
    return df if experiment is None else df.assign(experiment=experiment)


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


def test_similarity_figure_has_whole_epoch_ticks_and_a_legend_beside_the_curves(drawn, tmp_path):
    plots.plot_curves(_curves(), tmp_path / "similarity.png", reliability=reliability_frame())
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
    path = plots.plot_curves(_curves(), tmp_path / "similarity.png", reliability=reliability_frame())
    width = matplotlib.image.imread(path).shape[1]
    assert width > 2 * 5.2 * 110 * 1.05  # the grid's width plus the legend's (110 dpi)
