"""Side-by-side figures for a sweep over one more key than the seed (init, model, data, lr...):
one curve or panel per value of the swept key, each averaged over its seeds."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.patches import Patch

from netprobe.plots.common import (
    RunGroup,
    compact_ticks,
    log_worthy,
    new_figure,
    reveal_coinciding,
    short,
    step_axis,
)
from netprobe.plots.curves import PANELS, metric_curve
from netprobe.plots.weights import FIRST, LAST, draw_first_last

MAX_ROWS = 8  # layers shown in the distribution grids; evenly spread over the network


@dataclass
class Sweep:
    """Groups of runs that differ in one swept key, each group a set of seeds."""

    key: str  # "init", "model", "optim.lr", or several joined by ", "
    groups: list[RunGroup]
    labels: list[str]  # the swept value of each group

    @property
    def title(self) -> str:
        info = self.groups[0].runs[0].info
        fixed = [f"{k} {info.get(k)}" for k in ("model", "data", "init") if k not in self.key]
        return f"{self.key} sweep ({', '.join(fixed)})" if fixed else f"{self.key} sweep"


def swept(groups: list[RunGroup]) -> Sweep | None:
    """What a set of groups varies: one config group (its option names label the groups), one
    key (its values), or else several (the groups' own labels). None for a single group."""
    if len(groups) < 2:
        return None
    keys = sorted(set().union(*(g.varying for g in groups)))
    tops = {k.split(".")[0] for k in keys}
    if len(tops) == 1 and f"{next(iter(tops))}.name" in keys:
        key = next(iter(tops))
        labels = [str(g.varying.get(f"{key}.name")) for g in groups]
    elif len(keys) == 1:
        key = keys[0]
        labels = [str(g.varying.get(key)) for g in groups]
    else:
        key = ", ".join(k.removesuffix(".name") for k in keys)
        labels = [g.label for g in groups]
    order = sorted(range(len(groups)), key=lambda i: _sort_key(labels[i]))
    return Sweep(key, [groups[i] for i in order], [labels[i] for i in order])


def _sort_key(label: str) -> tuple[int, float, str]:
    try:
        return (0, float(label), label)  # learning rates and widths in numeric order
    except ValueError:
        return (1, 0.0, label)


@dataclass(frozen=True)
class ComparisonSpec:
    name: str
    caption: str
    draw: Callable[[Sweep], Any]

    def describe(self, sweep: Sweep) -> str:
        """The caption with how many runs stand behind each swept value."""
        counts = ", ".join(f"{label}: {g.n}" for label, g in zip(sweep.labels, sweep.groups))
        return f"{self.caption} Runs per {sweep.key}: {counts}."


COMPARISONS: dict[str, ComparisonSpec] = {}


def comparison(name: str, caption: str) -> Callable[[Callable[[Sweep], Any]], Callable]:
    """Register a comparison figure: `draw(sweep)` returns a Figure, {suffix: Figure} or None."""

    def register(draw: Callable[[Sweep], Any]) -> Callable[[Sweep], Any]:
        COMPARISONS[name] = ComparisonSpec(name, caption, draw)
        return draw

    return register


def _colors(n: int) -> list[Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "viridis"]
    return [cmap(i if n <= 10 else i / max(n - 1, 1)) for i in range(n)]


@comparison(
    "compare_curves",
    "Training curves per value of the swept key, each averaged over its runs (mean ± std, n in "
    "the legend); loss on a log axis when it spans more than two decades, a diverged run ending "
    "in ×.",
)
def compare_curves(sweep: Sweep):
    frames = [g.scalars("train") for g in sweep.groups]
    if all(df.empty for df in frames):
        return None
    fig, axes = new_figure(2, 2, size=(5.6, 3.6))
    colors = _colors(len(sweep.groups))
    styles = ["-", "--", ":", "-."]
    for ax, (metric, title, x) in zip(axes.flat, PANELS):
        ax.set_title(title)
        step_axis(ax, "epoch" if x == "epoch" else "optimizer step")
        parts = [df[df["metric"] == metric] if not df.empty else df for df in frames]
        values = np.concatenate([p["value"].to_numpy(float) for p in parts if not p.empty] or [[]])
        if values.size == 0:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
            continue
        log = "loss" in metric and log_worthy(values)
        if log:
            ax.set_yscale("log")
        for k, (part, group, label, color) in enumerate(
            zip(parts, sweep.groups, sweep.labels, colors)
        ):
            if part.empty:
                continue
            if x == "epoch":
                part = part.assign(epoch=part["epoch"] + 1)  # epochs counted from 1
            style = styles[(k // 10) % len(styles)]  # colours repeat after ten: lines differ
            marker = "o" if x == "epoch" and part[x].nunique() < 30 else None
            metric_curve(ax, part, x, log, label, color, group.n, named_marks=False, ls=style,
                         marker=marker, markersize=3)  # fmt: skip
        if "acc" in metric:
            ax.set_ylim(0, 1.02)
        reveal_coinciding(ax)
        if not log:
            compact_ticks(ax, "y")
        ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[1, 1].get_legend_handles_labels()
    # Below the panels: beside them, long labels (a mixed folder's groups) ran into the title.
    ncol = min(len(labels), 4 if max(map(len, labels), default=0) <= 24 else 1)
    fig.legend(handles, labels, title=sweep.key, loc="outside lower center", ncol=ncol, fontsize=8)
    fig.suptitle(sweep.title)
    return fig


@comparison(
    "compare_final",
    "Final validation accuracy (bars from 0) and loss (mean ± std as a point, log axis when it "
    "spans more than two decades) per value of the swept key, each seed a dot; a run that never "
    "closed (crashed, still running) is a hollow dot at the last value it recorded, left out of "
    "the mean; a value whose runs left none (diverged, failed) says so with their status.",
)
def compare_final(sweep: Sweep):
    rows = []
    for i, group in enumerate(sweep.groups):
        for run in group.runs:
            results = run.results()
            for metric in ("val_acc", "val_loss"):
                value = results.values.get(metric)
                rows.append({"i": i, "metric": metric, "value": value, "final": results.final,
                             "epochs": results.epochs})  # fmt: skip
    df = pd.DataFrame(rows).dropna(subset=["value"])
    if df.empty:
        return None
    # Each label whole, a line per key (`init=zeros` over `optim.lr=0.1`): the keys are what
    # tells the bars apart. Side by side while they fit, else each on one line turned upright
    # (slanted, they would run under the neighbouring panel).
    ticks = [
        _tick_label(label, g.n, _unfinished(g)) for label, g in zip(sweep.labels, sweep.groups)
    ]
    chars = max(len(line) for t in ticks for line in t.splitlines())
    upright = len(ticks) * chars <= 90
    if not upright:
        ticks = [t.replace("\n", ", ").replace(", (n=", " (n=") for t in ticks]
    per_value = 0.085 * chars + 0.2 if upright else 0.3
    width = max(3.6, per_value * len(ticks) + 1.0)
    below = 0.0 if upright else 0.06 * max(map(len, ticks))  # inches the upright labels take
    fig, axes = new_figure(1, 2, size=(width, 4.0 + below))
    colors = _colors(len(sweep.groups))
    x = np.arange(len(sweep.groups))
    for ax, (metric, title) in zip(axes[0], [("val_acc", "final validation accuracy"),
                                             ("val_loss", "final validation loss")]):  # fmt: skip
        shown = df[(df["metric"] == metric) & np.isfinite(df["value"].astype(float))]
        part = shown[shown["final"]]
        stats = part.groupby("i")["value"].agg(["mean", "std"]).reindex(x)
        if metric == "val_acc":
            ax.bar(x, stats["mean"], 0.7, yerr=stats["std"].fillna(0), color=colors, alpha=0.55)
        else:
            # A loss has no natural baseline (and on a log axis none at all): no bars.
            ax.errorbar(x, stats["mean"], yerr=stats["std"].fillna(0), fmt="none",
                        ecolor="0.3", capsize=4, zorder=2)  # fmt: skip
            ax.scatter(x, stats["mean"], s=160, marker="_", c=colors, linewidths=3, zorder=2)
            if log_worthy(shown["value"]):
                ax.set_yscale("log")
            else:
                compact_ticks(ax, "y")
        # Seeds of one value side by side, so equal results stay visible as separate dots; a
        # run that never closed is hollow: where it stood when it stopped, not a final value.
        rank = shown.groupby("i").cumcount().to_numpy()
        size = shown.groupby("i")["value"].transform("size").to_numpy()
        jitter = (rank - (size - 1) / 2) * min(0.08, 0.5 / size.max(initial=1))
        final = shown["final"].to_numpy(bool)
        at = shown["i"].to_numpy() + jitter
        ax.scatter(at[final], shown["value"][final], s=12, color="black", zorder=3)
        ax.scatter(at[~final], shown["value"][~final], s=18, facecolors="none",
                   edgecolors="black", zorder=3)  # fmt: skip
        for x_at, (_, row) in zip(at[~final], shown[~final].iterrows()):
            epoch = f"epoch {int(row['epochs'])}" if pd.notna(row["epochs"]) else "no epoch"
            # Under its dot: beside it, it would cover a neighbouring seed's or leave the panel.
            ax.annotate(epoch, (x_at, row["value"]), xytext=(0, -5), textcoords="offset points",
                        ha="center", va="top", fontsize=7, color="0.35")  # fmt: skip
        # A value with no final number says why (its runs diverged, failed, crashed...), not a
        # blank that reads as a bar of 0.
        for i in sorted(set(x) - set(part["i"])):
            why = ", ".join(sorted({run.status for run in sweep.groups[i].runs}))
            ax.text(i, 0.03, f"no final value\n({why})", transform=ax.get_xaxis_transform(),
                    ha="center", va="bottom", fontsize=8, color="0.35")  # fmt: skip
        if upright:
            ax.set_xticks(x, ticks, fontsize=8)
        else:
            ax.set_xticks(x, ticks, fontsize=8, rotation=90)
        ax.set_title(title)
        if metric == "val_acc":
            ax.set_ylim(0, 1.02)
        ax.grid(axis="y", alpha=0.3)
    # One axis label and a title, each wrapped to the figure's width, so neither runs off it.
    label = _wrap(sweep.key, 2 * width, 10)
    if not df["final"].all():
        label += "\n" + _wrap(UNFINISHED, 2 * width, 10)
    fig.supxlabel(label)
    fig.suptitle(_wrap(sweep.title, 2 * width, 12))
    return fig


UNFINISHED = (
    "○ the last value a run that never closed (crashed, running) recorded: not final, left out "
    "of the mean"
)


def _unfinished(group: RunGroup) -> str:
    """How many of a group's runs never closed, by status: `1 crashed`, or ``."""
    statuses = [r.status for r in group.runs if r.status in ("running", "crashed")]
    return ", ".join(f"{statuses.count(s)} {s}" for s in sorted(set(statuses)))


def _tick_label(label: str, n: int, unfinished: str = "") -> str:
    """A swept value as a tick label: one line per `key=value` of a label that joins several,
    then the count of its runs and of those that never closed."""
    count = f"(n={n}, {unfinished})" if unfinished else f"(n={n})"
    return "\n".join([*re.split(r",(?! )", label), count])


def _wrap(text: str, width: float, points: float) -> str:
    """`text` in lines that fit `width` inches at a font of `points` size."""
    return textwrap.fill(text, max(20, int(width * 110 / points)), break_on_hyphens=False)


def _before_after(
    sweep: Sweep, probe: str, source: str, what: str, unit: str
) -> dict[str, Any] | None:
    """A grid of layers (rows) × swept values (columns): the first capture against the last."""
    hists = []
    for group in sweep.groups:
        df = group.runs[0].histograms(probe=probe, source=source)
        hists.append(df)
    if all(df.empty for df in hists):
        return None
    reference = next(g for g, df in zip(sweep.groups, hists) if not df.empty)
    layers = reference.ordered(set().union(*(set(df["layer"]) for df in hists)))
    if len(layers) > MAX_ROWS:
        picks = np.unique(np.linspace(0, len(layers) - 1, MAX_ROWS).round().astype(int))
        layers = [layers[i] for i in picks]
    ncols = len(sweep.groups)
    # Wide enough for the title even with two or three columns.
    fig, axes = new_figure(len(layers), ncols, size=(max(2.6, 8.0 / ncols), 1.9))
    for col, (df, label) in enumerate(zip(hists, sweep.labels)):
        # Each value's own captures: a run that stopped early (diverged at once) has fewer.
        first, last = (int(df["step"].min()), int(df["step"].max())) if not df.empty else (0, 0)
        span = f"step {first} → {last}" if last > first else f"step {first} only"
        axes[0, col].set_title(f"{label}\n{span}" if not df.empty else label, fontsize=10)
        for row, layer in enumerate(layers):
            ax = axes[row, col]
            part = df[df["layer"] == layer] if not df.empty else df
            if part.empty:
                ax.text(0.5, 0.5, "not recorded", ha="center", va="center",
                        transform=ax.transAxes, fontsize=8)  # fmt: skip
                ax.set_xticks([]), ax.set_yticks([])
            else:
                at = part["step"]
                rows = [part[at == at.min()].iloc[0], part[at == at.max()].iloc[0]]
                draw_first_last(ax, rows[0], rows[1] if at.max() > at.min() else None)
            if col == 0:
                ax.set_ylabel(short(layer, 22), fontsize=8)
        axes[-1, col].set_xlabel(unit, fontsize=8)
    handles = [
        Patch(facecolor=FIRST, alpha=0.5, label="first capture (steps: column titles)"),
        Patch(facecolor="none", edgecolor=LAST, lw=1.4, label="last capture"),
        Patch(facecolor="none", edgecolor="0.3", hatch="///", label="outside the bins"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=8)
    fig.suptitle(f"{what} before and after training, per {sweep.key}\n{sweep.title}, first seed")
    return fig


@comparison(
    "compare_weights",
    "Weight distributions per layer before and after training, one column per swept value "
    "(probe weights).",
)
def compare_weights(sweep: Sweep):
    return _before_after(sweep, "weights", "weight", "Weight distributions", "weight value")


@comparison(
    "compare_features",
    "Feature (layer output) distributions on the training probe batch before and after "
    "training, one column per swept value (probe activations).",
)
def compare_features(sweep: Sweep):
    return _before_after(sweep, "activations", "train", "Feature distributions", "output value")
