"""Plots of a run: in the terminal (plotext) and as a PNG (matplotlib, no display needed).

Stored names (the run's, each site's) are labels here: they pass through ``clean`` first, and
for matplotlib every ``$`` is escaped so a name is never parsed as mathtext.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from veil.cli.render import clean
from veil.names import METRIC_LABELS

if TYPE_CHECKING:
    from server.read.dashboard import MetricSeries

LABELS = METRIC_LABELS
MAX_SITE_LINES = 12  # more sites than this: plot the largest and smallest ε, and the max
LABEL = 40  # characters of a stored name in a legend


def png_label(name: str, limit: int = LABEL) -> str:
    """A stored name as matplotlib text: cleaned, ``$`` escaped (no mathtext), no leading ``_`` (hidden)."""
    text = clean(name, limit).replace("$", "\\$")
    return " " + text if text.startswith("_") else text


def _points(rounds: list[int], values: list[float | None]) -> tuple[list[int], list[float]]:
    pairs = [(r, v) for r, v in zip(rounds, values, strict=True) if v is not None]
    return [r for r, _ in pairs], [v for _, v in pairs]


def site_lines(series: MetricSeries) -> dict[str, list[float | None]]:
    """The per-site ε lines to draw: all of them, or the extremes when there are many."""
    lines = series.epsilon_by_site
    if len(lines) <= MAX_SITE_LINES:
        return lines
    final = {k: max((v for v in vals if v is not None), default=0.0) for k, vals in lines.items()}
    order = sorted(final, key=final.__getitem__)
    keep = order[: MAX_SITE_LINES // 2] + order[-(MAX_SITE_LINES // 2):]
    return {k: lines[k] for k in sorted(keep, key=order.index)}


def terminal_plot(series: MetricSeries, metric: str, *, width: int, height: int, colour: bool) -> str:
    """The plot as text; raises ValueError when there is nothing to draw."""
    import plotext as plt

    plt.clear_figure()
    plt.plotsize(width, height)
    if not colour:
        plt.theme("clear")
    drawn = 0
    if metric == "epsilon":
        for site, values in site_lines(series).items():
            xs, ys = _points(series.rounds, values)
            if xs:
                plt.plot(xs, ys, label=clean(site, LABEL), marker="dot")
                drawn += 1
        if series.epsilon_cap is not None and drawn:
            plt.horizontal_line(series.epsilon_cap)
    else:
        xs, ys = _points(series.rounds, series.values(metric))
        if xs:
            plt.plot(xs, ys, label=LABELS[metric], marker="dot")
            drawn = 1
    if not drawn:
        hidden = metric in ("accuracy", "loss") and any(series.encrypted)
        what = "ε" if metric == "epsilon" else metric
        invalid = any(key.startswith(what) for key in series.problems)
        raise ValueError(f"run {series.run_id} has no {'valid ' if invalid else ''}{LABELS[metric]} to plot"
                         + ("; it is encrypted: pass --key KEYSET/secret.ckks" if hidden else "")
                         + (f"; its stored values fail their checks: veil metrics {series.run_id} names them"
                            if invalid else ""))
    plt.title(f"run {series.run_id} ({clean(series.name, 80)}): {LABELS[metric]}")
    plt.xlabel("round")
    plt.xticks(series.rounds if len(series.rounds) <= 20 else None)
    return str(plt.build())


def png(series: MetricSeries, path: Path, *, without_dp: bool = False) -> list[str]:
    """Accuracy, loss and per-site ε per round in one image; returns the panel titles drawn.

    A run trained ``without_dp`` has no ε: its third panel says so instead of drawing empty axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), dpi=110)
    titles = []
    ax = axes[0]
    xs, ys = _points(series.rounds, series.accuracy)
    if xs:
        ax.plot(xs, ys, marker="o", color="tab:blue")
        ax.set_ylim(0, 1)
    else:
        ax.text(0.5, 0.5, "encrypted\n(pass --key to decrypt)" if any(series.encrypted) else "no evaluation",
                ha="center", va="center", transform=ax.transAxes)
    titles.append("evaluation accuracy")
    ax = axes[1]
    for values, label in ((series.loss, "evaluation loss"), (series.train_loss, "train loss")):
        xs, ys = _points(series.rounds, values)
        if xs:
            ax.plot(xs, ys, marker="o", label=label)
    ax.legend(loc="upper right", fontsize=8)
    titles.append("loss")
    ax = axes[2]
    lines = {} if without_dp else site_lines(series)
    for site, values in lines.items():
        xs, ys = _points(series.rounds, values)
        if xs:
            ax.plot(xs, ys, marker=".", linewidth=1, label=png_label(site))
    if series.epsilon_cap is not None:
        ax.axhline(series.epsilon_cap, color="tab:red", linestyle="--", linewidth=1,
                   label="lifetime ε cap (ledger)")
    if without_dp:
        ax.text(0.5, 0.5, "NOT private:\ntrained without DP (privacy: none)", ha="center", va="center",
                transform=ax.transAxes)
    elif len(lines) <= MAX_SITE_LINES:
        ax.legend(loc="upper left", fontsize=7, ncol=2)
    titles.append("no ε (not private)" if without_dp else "run ε per site")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        if series.rounds and len(series.rounds) <= 20:
            ax.set_xticks(series.rounds)
    fig.suptitle(f"run {series.run_id} ({png_label(series.name, 80)})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return titles
