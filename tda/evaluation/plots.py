"""Matplotlib figures of the evaluate stage (headless backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def plot_curves(curves: pd.DataFrame, path: Path, title: str = "") -> Path:
    """A grid: rows = centring on/off, columns = metric; one line per method with ±1 SE band."""
    centerings = sorted(curves.centered.unique(), reverse=True)
    metrics = list(dict.fromkeys(curves.metric))
    fig, axes = plt.subplots(len(centerings), len(metrics), figsize=(5 * len(metrics), 3.6 * len(centerings)),
                             squeeze=False)
    for r, centered in enumerate(centerings):
        for c, metric in enumerate(metrics):
            ax = axes[r][c]
            sub = curves[(curves.centered == centered) & (curves.metric == metric)]
            for method, g in sub.groupby("method", sort=True):
                ax.plot(g.x, g["mean"], marker="o", ms=3, label=method)
                ax.fill_between(g.x, g["mean"] - g.se.fillna(0), g["mean"] + g.se.fillna(0), alpha=0.2)
            ax.set_xlabel(f"further-training {sub.x_name.iloc[0] if len(sub) else 'checkpoint'}")
            ax.set_ylabel(f"{metric} ({'centred' if centered else 'not centred'})")
            ax.grid(alpha=0.3)
            ax.axhline(0, color="k", lw=0.5)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
