"""Weight distributions: first vs last histogram per tensor, their evolution, and their moments."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from netprobe.plots.common import (
    RunGroup,
    compact_ticks,
    figure,
    layer_figure,
    layer_legend,
    panel_grid,
    short,
    stats_panel,
    whole_numbers,
)

PROBE = "weights"
FIRST, LAST = "tab:blue", "tab:orange"


def trained_epochs(df: pd.DataFrame) -> np.ndarray:
    """Epochs of training behind each row: 0 for the capture before the first step, else epoch + 1
    (a capture after epoch e, counted from 0 as in the tables, has e + 1 epochs behind it)."""
    return np.where(df["step"].to_numpy() == 0, 0, df["epoch"].to_numpy() + 1)


def capture_label(step: int, epoch: int) -> str:
    return "before training" if step == 0 else f"after epoch {epoch + 1} (step {step})"


def grid_shape(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(max_cols, max(1, math.ceil(math.sqrt(n))))
    return math.ceil(n / cols), cols


def first_run(group: RunGroup) -> tuple[int, str]:
    """Distributions are drawn from one run (bins differ between runs): its index and a note."""
    return 0, group.seed_note


def draw_first_last(ax: Axes, first: pd.Series, last: pd.Series | None) -> None:
    """Two histograms, each in its own bins, as densities (fraction of values per unit of value,
    so bins of different widths compare), first filled, last outlined (None: the first is the
    only capture, drawn alone). What fell outside a histogram's bins is a hatched bar just beyond
    its end, of the same area (its share). When one range is far narrower than the other
    (features that grew), an inset shows its shape."""
    if last is None:
        _first_last(ax, [(first, FIRST, True)])
        return
    spans = [max(r["edges"][-1] - r["edges"][0], 1e-300) for r in (first, last)]
    _first_last(ax, [(first, FIRST, True), (last, LAST, False)])
    if max(spans) > 4 * min(spans):
        narrow = 0 if spans[0] < spans[1] else 1
        row, color, filled = [(first, FIRST, True), (last, LAST, False)][narrow]
        inset = ax.inset_axes((0.03, 0.5, 0.34, 0.42) if narrow == 0 else (0.63, 0.5, 0.34, 0.42))
        _first_last(inset, [(row, color, filled)])
        inset.set_yticks([])
        inset.set_title("zoom", fontsize=6, pad=1)
        inset.tick_params(labelsize=5.5, length=2, pad=1)
        inset.xaxis.set_major_locator(MaxNLocator(3))


def _first_last(ax: Axes, rows: list[tuple[pd.Series, str, bool]]) -> None:
    lo = min(r["edges"][0] for r, _, _ in rows)
    hi = max(r["edges"][-1] for r, _, _ in rows)
    pad = 0.05 * ((hi - lo) or 1.0)
    outside = False
    for row, color, filled in rows:
        edges = np.asarray(row["edges"], dtype=float)
        counts = np.asarray(row["counts"], dtype=float)
        total = max(counts.sum() + row["below"] + row["above"], 1)
        widths = np.diff(edges)
        density = counts / total / np.where(widths > 0, widths, 1.0)
        # Steps as a line (and a filled area) rather than `stairs` patches: far cheaper to draw.
        y = np.append(density, density[-1])
        if filled:
            ax.fill_between(edges, y, step="post", color=color, alpha=0.35, lw=0)
        ax.plot(edges, y, drawstyle="steps-post", color=color, lw=0.8 if filled else 1.4)
        for count, x in ((row["below"], lo - pad), (row["above"], hi + pad)):
            if count:
                outside = True
                ax.bar(x, count / total / (0.8 * pad), 0.8 * pad, color="none",
                       edgecolor=color, hatch="///", lw=1)  # fmt: skip
    if outside:
        ax.axvline(lo, color="0.4", lw=0.6, ls=":")
        ax.axvline(hi, color="0.4", lw=0.6, ls=":")
        ax.set_xlim(lo - 1.6 * pad, hi + 1.6 * pad)
    else:
        ax.set_xlim(lo, hi)
    ax.set_ylim(bottom=0)
    few_ticks(ax)
    ax.grid(alpha=0.25)


def few_ticks(ax: Axes) -> None:
    """At most about four small tick labels per axis, each with its own magnitude: grids of dozens
    of panels stay legible and quick to draw (every tick label is measured at each draw)."""
    ax.xaxis.set_major_locator(MaxNLocator(4))
    ax.yaxis.set_major_locator(MaxNLocator(4))
    compact_ticks(ax)
    ax.tick_params(labelsize=7, length=2.5, pad=2)


def moments_title(
    name: str, values: dict[tuple[str, int], float], first_step: int, last_step: int
) -> str:
    """`name` and mean, std, skew (and dead_frac where recorded) at the first → last capture;
    `values` maps (metric, step) to the layer's value."""

    def change(metric: str, symbol: str, fmt: str = ".2g") -> str:
        first = values.get((metric, first_step), float("nan"))
        last = values.get((metric, last_step), float("nan"))
        if first_step == last_step:  # one capture: no change to show
            return f"{symbol} {first:{fmt}}"
        return f"{symbol} {first:{fmt}} → {last:{fmt}}"

    third = change("skew", "skew")
    if any(metric == "dead_frac" for metric, _ in values):
        third += ",  " + change("dead_frac", "dead", ".0%")
    return f"{name}\n{change('mean', 'μ')},  {change('std', 'σ')}\n{third}"


def by_layer(stats: pd.DataFrame) -> dict[str, dict[tuple[str, int], float]]:
    """`stats` (columns layer, metric, step, value) as {layer: {(metric, step): value}}."""
    out: dict[str, dict[tuple[str, int], float]] = {}
    for layer, metric, step, value in zip(
        stats["layer"], stats["metric"], stats["step"], stats["value"]
    ):
        out.setdefault(layer, {})[(metric, int(step))] = float(value)
    return out


def suptitle(fig, title: str) -> None:
    """`title` at the top of a `panel_grid` figure, within its top margin."""
    fig.suptitle(title, y=1 - 0.12 / fig.get_size_inches()[1], va="top")


def histogram_grid(
    group: RunGroup,
    hists: pd.DataFrame,
    stats: pd.DataFrame,
    title: str,
    xlabel: str,
    labels: dict[str, str] | None = None,
):
    """One panel per layer (forward order): the first and last capture's histograms overlaid;
    `stats` holds the layers' `mean`, `std`, `skew` (and `dead_frac`) for the panel titles."""
    labels = labels or {}
    layers = group.ordered(hists["layer"])
    steps = sorted(hists["step"].unique())
    first_step, last_step = int(steps[0]), int(steps[-1])
    rows, cols = grid_shape(len(layers))
    # Fixed spacing: room for three title lines above each panel and ticks below it.
    fig, axes = panel_grid(
        rows, cols, panel=(3.2, 2.2), gap=(0.45, 0.85), margins=(0.75, 0.2, 1.05, 0.95)
    )
    epoch_of = dict(zip(hists["step"], hists["epoch"]))
    ends = hists[hists["step"].isin([first_step, last_step])]
    captured = {(layer, int(step)): row for (layer, step), row in ends.groupby(["layer", "step"])}
    values = by_layer(stats)
    for ax, layer in zip(axes.flat, layers):
        first, last = captured.get((layer, first_step)), captured.get((layer, last_step))
        if first is None or last is None:
            ax.set_axis_off()
            continue
        draw_first_last(ax, first.iloc[0], last.iloc[0] if last_step > first_step else None)
        name = labels.get(layer, short(layer, 34))
        # y given: the title is not re-placed at each draw (no ticks on top to dodge).
        text = moments_title(name, values.get(layer, {}), first_step, last_step)
        ax.set_title(text, fontsize=8, y=1.0)
    label_grid(axes, len(layers), xlabel, "density (fraction per unit)")
    handles = [
        Patch(facecolor=FIRST, alpha=0.5, label=capture_label(first_step, epoch_of[first_step]))
    ]
    if last_step > first_step:
        last_label = capture_label(last_step, epoch_of[last_step])
        handles.append(Patch(facecolor="none", edgecolor=LAST, lw=1.4, label=last_label))
    else:
        handles[0].set_label(f"{handles[0].get_label()}, the only capture")
    if (hists["below"] + hists["above"]).any():
        handles.append(
            Patch(
                facecolor="none",
                edgecolor="0.3",
                hatch="///",
                label="outside the bins (area: share)",
            )
        )
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9)
    suptitle(fig, title)
    return fig


def _first_run_grid(group: RunGroup, grid, what: str):
    """`grid` (`histogram_grid` or `evolution_grid`) of the first run's weights, titled `what`."""
    run, which = first_run(group)
    hists = group.runs[run].histograms(PROBE)
    if hists.empty:
        return None
    stats = group.runs[run].scalars(PROBE)
    return grid(group, hists, stats, f"{what} — {group.title}, {which}", "weight value")


@figure(
    "weights_histograms",
    "Weight histogram of each tracked tensor before training (filled) and at the last capture "
    "(outline), in the run's fixed bins; titles give mean, std and skew first → last.",
    averages=False,
)
def weights_histograms(group: RunGroup):
    return _first_run_grid(group, histogram_grid, "Weight distributions")


def _totals(rows: pd.DataFrame) -> np.ndarray:
    counts = np.array([np.sum(c) for c in rows["counts"]], dtype=float)
    return counts + rows["below"].to_numpy(float) + rows["above"].to_numpy(float)


def shared_bins(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """One layer's captures (sorted by step) on one grid of bins: their own when all share them
    (weights), else evenly spaced bins over the union of their ranges, each capture's counts
    spread by its cumulative distribution (uniform within its own bins). Returns the edges and
    the fraction of each capture's values per bin [captures, bins]."""
    edges = [np.asarray(e, dtype=float) for e in rows["edges"]]
    counts = [np.asarray(c, dtype=float) for c in rows["counts"]]
    totals = np.maximum(_totals(rows), 1)[:, None]
    if all(len(e) == len(edges[0]) and np.array_equal(e, edges[0]) for e in edges):
        return edges[0], np.stack(counts) / totals
    grid = np.linspace(min(e[0] for e in edges), max(e[-1] for e in edges),
                       max(len(e) for e in edges) + 30)  # fmt: skip
    spread = []
    for e, c in zip(edges, counts):
        cdf = np.concatenate([[0.0], np.cumsum(c)])
        spread.append(np.diff(np.interp(grid, e, cdf, left=0.0, right=cdf[-1])))
    return grid, np.stack(spread) / totals


def evolution_grid(
    group: RunGroup,
    hists: pd.DataFrame,
    stats: pd.DataFrame,
    title: str,
    ylabel: str,
    labels: dict[str, str] | None = None,
):
    """One heatmap per layer: capture × bin, colour the fraction of values in the bin (log, its
    range from the data); values outside the bins in a band beyond each end, past a dotted line.
    Captures in bins of their own are spread onto one grid (`shared_bins`)."""
    labels = labels or {}
    layers = group.ordered(hists["layer"])
    rows, cols = grid_shape(len(layers))
    # Fixed spacing: a title line above each panel, ticks below, the colour bar on the right.
    fig, axes = panel_grid(
        rows, cols, panel=(3.0, 2.2), gap=(0.5, 0.55), margins=(0.75, 1.2, 0.8, 0.95)
    )
    mesh = None
    per_layer = {layer: rows.sort_values("step") for layer, rows in hists.groupby("layer")}
    values = by_layer(stats)
    shared = {layer: shared_bins(per_layer[layer]) for layer in layers}
    norm = _fraction_scale([frac for _, frac in shared.values()])
    for ax, layer in zip(axes.flat, layers):
        mesh = _evolution(ax, per_layer[layer], *shared[layer], norm, values.get(layer, {}))
        ax.set_title(labels.get(layer, short(layer, 34)), fontsize=8, y=1.0)
        few_ticks(ax)
        ax.xaxis.set_major_locator(whole_numbers(5))
    label_grid(axes, len(layers), "epochs trained", ylabel)
    if mesh is not None:
        _colour_bar(fig, mesh, axes.flat[0])
    suptitle(fig, title)
    return fig


def label_grid(axes: np.ndarray, panels: int, xlabel: str, ylabel: str) -> None:
    """A `panel_grid` with `panels` panels drawn: the unused ones blank, the x label along the
    bottom row, the y label down the first column."""
    for ax in axes.flat[panels:]:
        ax.set_axis_off()
    for ax in axes[-1]:
        ax.set_xlabel(xlabel, fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel, fontsize=8)


def _fraction_scale(fractions: list[np.ndarray]) -> LogNorm:
    """A log colour scale spanning the nonzero fractions drawn (at most six decades)."""
    fracs = np.concatenate([f[f > 0] for f in fractions] or [np.ones(1)])
    top = float(fracs.max()) if fracs.size else 1.0
    return LogNorm(vmin=max(float(fracs.min()) if fracs.size else 1e-4, top * 1e-6), vmax=top)


def _evolution(
    ax: Axes,
    mine: pd.DataFrame,
    edges: np.ndarray,
    frac: np.ndarray,
    norm: LogNorm,
    values: dict[tuple[str, int], float],
):
    """One layer's heatmap (its captures `mine` on the bins `edges`, `frac` per capture and bin)
    with mean ± std in cyan when recorded at every capture; returns the mesh."""
    below, above = mine["below"].to_numpy(float), mine["above"].to_numpy(float)
    outside = bool(below.any() or above.any())
    if outside:
        # What fell outside the bins, as one cell two bins tall beyond each end.
        total = np.maximum(_totals(mine), 1)
        frac = np.column_stack([below / total, frac, above / total])
        step = edges[1] - edges[0]
        edges = np.concatenate([[edges[0] - 2 * step], edges, [edges[-1] + 2 * step]])
    x = trained_epochs(mine)
    # Cell edges between consecutive captures, so uneven gaps keep their width.
    mids = (x[1:] + x[:-1]) / 2 if len(x) > 1 else np.array([])
    xe = np.concatenate([[x[0] - 0.5], mids, [x[-1] + 0.5]])
    mesh = ax.pcolormesh(
        xe, edges, np.ma.masked_less_equal(frac.T, 0), cmap="magma", norm=norm, shading="flat"
    )
    steps = [int(s) for s in mine["step"]]
    if all(("mean", s) in values and ("std", s) in values for s in steps):
        m = np.array([values[("mean", s)] for s in steps])
        s = np.array([values[("std", s)] for s in steps])
        ax.plot(x, m, color="cyan", lw=1, label="mean")
        ax.plot(x, m + s, color="cyan", lw=0.7, ls="--", label="mean ± std")
        ax.plot(x, m - s, color="cyan", lw=0.7, ls="--")
    if outside:
        for y in (edges[1], edges[-2]):
            ax.axhline(y, color="white", lw=0.6, ls=":")
    ax.set_ylim(edges[0], edges[-1])
    ax.set_facecolor("black")
    return mesh


def _colour_bar(fig, mesh, first: Axes) -> None:
    """The colour bar right of an `evolution_grid`, as tall as the grid (at most 5 in), and the
    legend of `first`'s lines below it."""
    width, height = fig.get_size_inches()
    tall = min(height - 0.8 - 0.95, 5.0)
    bar = fig.add_axes(
        (1 - 0.95 / width, (0.95 + (height - 0.8 - 0.95 - tall) / 2) / height,
         0.15 / width, tall / height)
    )  # fmt: skip
    fig.colorbar(mesh, cax=bar, label="fraction of values in bin")
    handles, labels = first.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8)


@figure(
    "weights_evolution",
    "How each tensor's weight histogram moves over training: epochs trained × weight value, "
    "colour the fraction of weights per bin (log), mean ± std in cyan.",
    averages=False,
)
def weights_evolution(group: RunGroup):
    return _first_run_grid(group, evolution_grid, "Weight histogram over training")


STAT_PANELS = [
    ("std", "standard deviation σ", True),
    ("skew", "skewness", False),
    ("dist_init", r"relative distance from init $\|W-W_0\|_2/\|W_0\|_2$", False),
]


@figure(
    "weights_stats",
    "Per-tensor weight std, skew and relative distance from initialization over training.",
)
def weights_stats(group: RunGroup):
    df = group.scalars(PROBE)
    if df.empty:
        return None
    df = df.assign(x=trained_epochs(df))
    fig, axes, colors = layer_figure(group, df, 1, 3, (4.4, 3.6))
    for ax, (metric, title, log) in zip(axes.flat, STAT_PANELS):
        part = df[df["metric"] == metric]
        stats_panel(ax, part[np.isfinite(part["value"])], colors, group.n, title, log)
        ax.set_xlabel("epochs trained")
    layer_legend(fig, axes.flat[0], group, "tensor", log=True)
    fig.suptitle(f"Weight statistics — {group.title}")
    return fig
