"""Matplotlib figures of the evaluate stage (headless backend). Every figure is drawn from
the same DataFrame that is written as CSV and logged to W&B."""

from __future__ import annotations

import os
import secrets
import socket
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from tda.evaluation.curves import split_half_label
from tda.evaluation.markdown import PEAK_DEFINITION_NAMES, centring


def _save(fig, path: Path, title: str = "") -> Path:
    """Write `fig` to `path` through a temporary file in the same directory and a rename, so
    `path` is never a truncated image (the evaluate stage also writes into a staging directory
    that is swapped in as a whole: tda.evaluation.output_set). The saved image is cropped to
    its content, legends placed outside the axes included. Closes `fig` either way."""
    # named like tda.artifacts' temporary files, so its clean-up recognises a killed writer's
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png", bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


STYLES = ["-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1))]


def _palette(n_lines: int) -> list:
    """Matplotlib's default cycle repeats after 10 colours; a damping sweep easily draws more lines."""
    return list(plt.get_cmap("tab10" if n_lines <= 10 else "tab20").colors)


def _colour_axes(axes, n_lines: int) -> None:
    for ax in np.ravel(axes):
        ax.set_prop_cycle(color=_palette(n_lines))


def _legend_right(fig, handles: list, labels: list[str], handlelength: float = 2.0):
    """One legend for the whole grid, right of it (outside every axes, so it hides no curve);
    `_save` crops the image to include it."""
    return fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 0.95), fontsize=8,
                      handlelength=handlelength, frameon=False)


def plot_curves(curves: pd.DataFrame, path: Path, title: str = "", reliability: pd.DataFrame | None = None,
                series: str = "method", style_by: str | None = None, notes: dict[str, str] | None = None) -> Path:
    """A grid: rows = centring on/off, columns = metric, x = further-training checkpoint (whole
    epochs or steps); one line per `series` value with a ±1 SE band; the gold standard's
    split-half reliability as a dashed black ceiling. With `style_by` (comparisons), colour =
    method and line style = that column's value, and the legend explains the two separately;
    rows whose method is `gold_split_half` are drawn black. `notes` (series value -> text,
    tda.evaluation.undefined.series_notes): what is undefined in that series and why, in the
    legend, so that a missing curve or point is not just a gap."""
    notes = notes or {}
    colors, styles = {}, {}
    if style_by is not None:
        methods = [m for m in dict.fromkeys(sorted(curves.method)) if m != "gold_split_half"]
        cycle = _palette(len(methods))
        colors = {m: cycle[i % len(cycle)] for i, m in enumerate(methods)}
        if "gold_split_half" in set(curves.method):
            colors["gold_split_half"] = "k"
        styles = {v: STYLES[i % len(STYLES)] for i, v in enumerate(dict.fromkeys(curves[style_by]))}
    centerings = sorted(curves.centered.unique(), reverse=True)
    metrics = list(dict.fromkeys(curves.metric))
    fig, axes = plt.subplots(len(centerings), len(metrics), figsize=(5.2 * len(metrics), 3.6 * len(centerings)),
                             squeeze=False)
    _colour_axes(axes, curves[series].nunique())
    for r, centered in enumerate(centerings):
        for c, metric in enumerate(metrics):
            ax = axes[r][c]
            sub = curves[(curves.centered == centered) & (curves.metric == metric)]
            for name, g in sub.groupby(series, sort=True):
                g = g.sort_values("x")
                kw = {}
                if style_by is not None:
                    kw = {"color": colors[g.method.iloc[0]], "linestyle": styles[g[style_by].iloc[0]]}
                label = f"{name} — {notes[name]}" if name in notes and style_by is None else name
                line, = ax.plot(g.x, g["mean"], marker="o", ms=3, label=_wrap(label), **kw)
                ax.fill_between(g.x, g["mean"] - g.se.fillna(0), g["mean"] + g.se.fillna(0), alpha=0.15,
                                color=line.get_color())
            if reliability is not None and len(reliability):
                rel = reliability[(reliability.centered == centered) & (reliability.metric == metric)].sort_values("x")
                if len(rel):
                    ax.plot(rel.x, rel["mean"], "k--", lw=1.2, label=f"gold split-half ({split_half_label(rel)})")
            ax.set_xlabel(f"further-training {sub.x_name.iloc[0] if len(sub) else 'checkpoint'}")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs and steps are whole numbers
            ax.set_ylabel(f"{metric} ({centring(centered)})")
            ax.grid(alpha=0.3)
            ax.axhline(0, color="k", lw=0.5)
    if style_by is None:
        _legend_right(fig, *axes[0][0].get_legend_handles_labels())
    else:
        _style_legend(fig, colors, styles, style_by, notes)
    return _save(fig, path, title)


def _wrap(label: str, width: int = 60) -> str:
    """A long legend entry (a note on what is undefined) over several lines."""
    return ("\n".join(textwrap.wrap(label, width, subsequent_indent="  ", break_on_hyphens=False))
            if len(label) > width else label)


def _style_legend(fig, colors: dict, styles: dict, style_by: str, notes: dict[str, str] | None = None) -> None:
    """The legend of a comparison: one section for the colours (methods, the gold standard's
    split-half reliability in black), one for the line styles, with handles long enough to
    tell the styles apart, and one for `notes` (series -> what is undefined and why)."""
    def header(text):
        return Line2D([], [], linestyle="none"), text
    rows = [header("colour: method")]
    rows += [(Line2D([], [], color=c, marker="o", ms=3), "gold split-half (ceiling)" if m == "gold_split_half" else m)
             for m, c in colors.items()]
    rows += [header(""), header(f"line style: {style_by}")]
    rows += [(Line2D([], [], color="0.3", linestyle=ls, lw=1.5), str(v)) for v, ls in styles.items()]
    if notes:
        rows += [header(""), header("undefined")] + [header(_wrap(f"{k}: {v}")) for k, v in notes.items()]
    legend = _legend_right(fig, [h for h, _ in rows], [t for _, t in rows], handlelength=4.5)
    for text, (_, label) in zip(legend.get_texts(), rows):
        if label.startswith(("colour:", "line style:")) or label == "undefined":
            text.set_fontweight("bold")


def plot_seed_windows(peaks: pd.DataFrame, path: Path, title: str = "", notes: dict[str, str] | None = None) -> Path:
    """Peak similarity over checkpoints against the number of seeds averaged (log x); colour =
    method, line style = the peak's definition (solid: the authors', the peak of the
    window-averaged curve; dashed: the mean of the windows' own peaks); `notes` (method ->
    text): what is undefined and why, in the legend."""
    centerings = sorted(peaks.centered.unique(), reverse=True)
    metrics = list(dict.fromkeys(peaks.metric))
    methods = sorted(peaks.method.unique())
    cycle = _palette(len(methods))
    colors = {m: cycle[i % len(cycle)] for i, m in enumerate(methods)}
    styles = {PEAK_DEFINITION_NAMES[d]: STYLES[i] for i, d in enumerate(PEAK_DEFINITION_NAMES)}
    fig, axes = plt.subplots(len(centerings), len(metrics), figsize=(5.2 * len(metrics), 3.6 * len(centerings)),
                             squeeze=False)
    for r, centered in enumerate(centerings):
        for c, metric in enumerate(metrics):
            ax = axes[r][c]
            sub = peaks[(peaks.centered == centered) & (peaks.metric == metric)]
            for (name, definition), g in sub.groupby(["method", "definition"], sort=True):
                g = g.sort_values("n_seeds_averaged")
                ax.errorbar(g.n_seeds_averaged, g.peak_mean, yerr=g.peak_se.fillna(0), marker="o", ms=3, capsize=2,
                            color=colors[name], linestyle=styles[PEAK_DEFINITION_NAMES[definition]])
            ax.set_xscale("log")
            ks = sorted(sub.n_seeds_averaged.unique())
            ax.set_xticks(ks, [str(k) for k in ks])
            ax.set_xlabel("seeds averaged in the gold standard (K)")
            ax.set_ylabel(f"peak {metric} ({centring(centered)})")
            ax.grid(alpha=0.3)
    _style_legend(fig, colors, styles, "peak definition", notes)
    return _save(fig, path, title)


def plot_adjustment(adjustment: pd.DataFrame, path: Path, title: str = "") -> Path:
    """Every method against the uncentred gold standard, adjusted (eq. 17; solid) and
    unadjusted (dashed), per checkpoint: colour = method, line style = gold standard."""
    gold = adjustment.adjusted.map({True: "adjusted (eq. 17)", False: "unadjusted"})
    curves = adjustment.assign(centered=False, **{"gold standard": gold}, line=adjustment.method + " / " + gold)
    return plot_curves(curves, path, title=title, series="line", style_by="gold standard")


def plot_distance(distance: pd.DataFrame, path: Path, title: str = "") -> Path:
    """‖θ_t − θ_start‖ of the full-data run per checkpoint, mean ± SE over seeds."""
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    d = distance.sort_values("x")
    ax.plot(d.x, d["mean"], "k-", marker="o", ms=3)
    ax.fill_between(d.x, d["mean"] - d.se.fillna(0), d["mean"] + d.se.fillna(0), color="k", alpha=0.15)
    ax.set_xlabel(f"further-training {d.x_name.iloc[0]}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("‖θ_t − θ_start‖ (full-data run)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    return _save(fig, path, title)


def plot_class_structure(cs: pd.DataFrame, path: Path, title: str = "", notes: dict[str, str] | None = None) -> Path:
    """Left: the centred cosine of the scores with the same-class indicator, the gold standard
    per checkpoint (the same centred or not) and every method (a horizontal dashed line: methods
    do not depend on the checkpoint). Right: the gold standard's mean score of own-class and
    other-class left-out instances per checkpoint. `notes` (source -> text): what is undefined
    and why, in the legend."""
    notes = notes or {}
    gold = cs[cs.source == "gold standard"]
    methods = cs[cs.source != "gold standard"]
    x_name = cs.x_name.iloc[0]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.4, 3.6))
    cycle = _palette(len(methods) + 1)
    for i, (_, m) in enumerate(methods.iterrows()):
        label = f"{m.source} — {notes[m.source]}" if m.source in notes else m.source
        left.axhline(m.cosine_same_class, color=cycle[(i + 1) % len(cycle)], linestyle="--", lw=1.2,
                     label=_wrap(label))
    g = gold[gold.centered == gold.centered.iloc[0]].sort_values("x")  # the cosine is the same centred or not
    left.plot(g.x, g.cosine_same_class, "k-", marker="o", ms=3, label="gold standard")
    left.fill_between(g.x, g.cosine_same_class - g.cosine_same_class_se.fillna(0),
                      g.cosine_same_class + g.cosine_same_class_se.fillna(0), color="k", alpha=0.1)
    for (centered, g), style in zip(gold.groupby("centered", sort=False), ("-", ":")):
        g = g.sort_values("x")
        for column, colour in (("same_class", "tab:red"), ("other_class", "tab:blue")):
            right.plot(g.x, g[column], color=colour, linestyle=style, marker="o", ms=3,
                       label=f"{'own' if column == 'same_class' else 'other'} class ({centring(centered)})")
            right.fill_between(g.x, g[column] - g[f"{column}_se"].fillna(0), g[column] + g[f"{column}_se"].fillna(0),
                               color=colour, alpha=0.1)
    left.set_ylabel("centred cosine with the same-class indicator")
    right.set_ylabel("gold standard: mean attribution")
    for ax in (left, right):
        ax.set_xlabel(f"further-training {x_name}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.axhline(0, color="k", lw=0.5)
        ax.grid(alpha=0.3)
    handles, labels = left.get_legend_handles_labels()
    more_handles, more_labels = right.get_legend_handles_labels()
    _legend_right(fig, handles + more_handles, labels + more_labels)
    return _save(fig, path, title)


def plot_sorted_scores(sorted_df: pd.DataFrame, path: Path, title: str = "", x_name: str = "epoch") -> Path:
    """Sorted, averaged, L2-normalised scores: gold standard at each chosen checkpoint
    (columns, at further-training `x_name` x; rows = centring) against every method."""
    gold = sorted_df[sorted_df.source == "gold standard"]
    methods = sorted_df[sorted_df.source != "gold standard"]
    centerings = sorted(gold.centered.unique(), reverse=True)
    cps = sorted(gold.checkpoint.unique())
    fig, axes = plt.subplots(len(centerings), len(cps), figsize=(4.2 * len(cps), 3.3 * len(centerings)), squeeze=False)
    for r, centered in enumerate(centerings):
        for c, t in enumerate(cps):
            ax = axes[r][c]
            g = gold[(gold.centered == centered) & (gold.checkpoint == t)]
            ax.plot(g["rank"], g.value, "k-", lw=2, label="gold standard")
            for name, m in methods.groupby("source", sort=True):
                ax.plot(m["rank"], m.value, lw=1, label=name)
            ax.set_title(f"gold standard at {x_name} {g.x.iloc[0]:g} ({centring(centered)})", fontsize=9)
            ax.set_xlabel("rank of left-out instance")
            ax.set_ylabel("normalised score")
            ax.axhline(0, color="k", lw=0.5)
            ax.grid(alpha=0.3)
    _legend_right(fig, *axes[0][0].get_legend_handles_labels())
    return _save(fig, path, title)


def plot_agreement(agreement: pd.DataFrame, methods: list[str], path: Path, title: str = "") -> Path:
    """Heatmaps of the mean method-vs-method cosine and Spearman, each cell's number in white
    on dark colours and black on light ones."""
    metrics = list(dict.fromkeys(agreement.metric))
    fig, axes = plt.subplots(1, len(metrics), figsize=(1.2 * len(methods) * len(metrics) + 3, 1.0 * len(methods) + 2),
                             squeeze=False)
    for c, metric in enumerate(metrics):
        m = np.eye(len(methods))
        for _, row in agreement[agreement.metric == metric].iterrows():
            i, j = methods.index(row.method_a), methods.index(row.method_b)
            m[i, j] = m[j, i] = row["mean"]
        ax = axes[0][c]
        im = ax.imshow(m, vmin=-1, vmax=1, cmap="RdBu")
        ax.set_xticks(range(len(methods)), methods, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(methods)), methods, fontsize=8)
        for i in range(len(methods)):
            for j in range(len(methods)):
                defined = not np.isnan(m[i, j])  # NaN: undefined (report.md says why)
                ax.text(j, i, f"{m[i, j]:.2f}" if defined else "undefined", ha="center", va="center",
                        fontsize=8 if defined else 6,
                        color=_text_colour(im.cmap(im.norm(m[i, j]))) if defined else "black")
        ax.set_title(f"mean {metric} between methods", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path, title)


def _text_colour(rgba) -> str:
    """White on a dark background, black on a light one (perceived luminance, ITU-R BT.601)."""
    r, g, b = rgba[:3]
    return "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"


def plot_image_examples(test_image, helpful: list, harmful: list, path: Path, title: str = "") -> Path:
    """One row: the test image, then the most helpful and most harmful left-out images, each
    (PIL image or array, caption)."""
    items = [(test_image[0], "test: " + test_image[1])] + [(im, "+ " + cap) for im, cap in helpful] + \
            [(im, "− " + cap) for im, cap in harmful]
    fig, axes = plt.subplots(1, len(items), figsize=(1.6 * len(items), 2.0), squeeze=False)
    for ax, (im, cap) in zip(axes[0], items):
        arr = np.asarray(im)
        ax.imshow(arr, cmap="gray" if arr.ndim == 2 else None)
        ax.set_title(cap, fontsize=6)
        ax.axis("off")
    return _save(fig, path, title)


def plot_detection(curves: pd.DataFrame, path: Path, title: str = "", marks: tuple[float, ...] = ()) -> Path:
    """Mislabel detection: the fraction of the flipped labels found against the fraction of the
    training set inspected, highest self-influence first (tda.evaluation.mislabel.detection_curves);
    one line per method, the random order dashed grey, the perfect one dotted black, the
    inspected fractions of the table (`marks`) as vertical lines. Left: all of it; right: the
    first 30 % inspected, where a practitioner looks."""
    methods = [m for m in dict.fromkeys(curves.method) if m not in ("random", "oracle")]
    fig, axes = plt.subplots(1, 2, figsize=(10.4, 4.0))
    _colour_axes(axes, len(methods))
    for ax, right in zip(axes, (1.0, 0.3)):
        for m in methods:
            g = curves[curves.method == m]
            ax.plot(g.inspected, g.found, label=m, lw=1.4)
        for m, style in (("random", dict(color="0.5", ls="--")), ("oracle", dict(color="k", ls=":"))):
            g = curves[curves.method == m]
            ax.plot(g.inspected, g.found, lw=1.0, label=m, **style)
        for p in marks:
            ax.axvline(p, color="0.8", lw=0.8, zorder=0)
        ax.set_xlim(0, right)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("fraction of the training set inspected (highest self-influence first)")
        ax.set_ylabel("fraction of the flipped labels found")
        ax.grid(alpha=0.3)
    _legend_right(fig, *axes[0].get_legend_handles_labels())
    return _save(fig, path, title)
