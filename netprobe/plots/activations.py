"""Feature distributions per layer and input source: first vs last capture, their evolution, and
the share of inactive and dead units over training."""

from __future__ import annotations

import pandas as pd
from matplotlib.ticker import PercentFormatter

from netprobe.plots.common import (
    RunGroup,
    figure,
    layer_figure,
    layer_legend,
    short,
    stats_panel,
)
from netprobe.plots.weights import evolution_grid, first_run, histogram_grid, trained_epochs

PROBE = "activations"
SOURCES = {
    "train": "fixed train batch",
    "valid": "fixed validation batch",
    "random": "uniform [0, 1) random inputs",
}


def _split(scalars: pd.DataFrame) -> pd.DataFrame:
    """Metrics stored as `source/stat` split into a `source` column and the plain stat."""
    parts = scalars["metric"].str.split("/", n=1, expand=True)
    return scalars.assign(source=parts[0], metric=parts[1])


def _labels(group: RunGroup) -> dict[str, str]:
    layers = group.runs[0].layers()
    modules = layers[layers["param"] == ""]
    return {m: f"{short(m, 26)} ({t})" for m, t in zip(modules["module"], modules["type"])}


def _per_source(group: RunGroup, grid, what: str) -> dict | None:
    """One `grid` figure (`histogram_grid` or `evolution_grid`) of the first run per input
    source, titled `what` on the source."""
    run, which = first_run(group)
    hists = group.runs[run].histograms(PROBE)
    if hists.empty:
        return None
    stats = _split(group.runs[run].scalars(PROBE))
    labels = _labels(group)
    figures = {}
    for source in [s for s in SOURCES if s in set(hists["source"])]:
        figures[source] = grid(
            group,
            hists[hists["source"] == source],
            stats[stats["source"] == source],
            f"{what} on the {SOURCES[source]} — {group.title}, {which}",
            "output value",
            labels,
        )
    return figures or None


@figure(
    "activation_distributions",
    "Output distribution of each tracked module (forward order) on one input source, at the "
    "first capture (filled) and the last (outline), each in bins spanning its own range (the "
    "0.1 % tails beyond, hatched); eval mode.",
    averages=False,
)
def activation_distributions(group: RunGroup):
    return _per_source(group, histogram_grid, "Feature distributions")


@figure(
    "activation_evolution",
    "How each module's output histogram moves over training on one input source: epochs trained "
    "× output value, colour the fraction of values per bin (log), mean ± std in cyan.",
    averages=False,
)
def activation_evolution(group: RunGroup):
    return _per_source(group, evolution_grid, "Feature histogram over training")


PANELS = [
    ("std", "output std", True),
    ("zero_frac", "inactive outputs: fraction ≤ 0", False),
    ("dead_frac", "dead units: ≤ 0 for every sample", False),
]


@figure(
    "activation_stats",
    "Output std, share of inactive outputs (≤ 0) and of dead units per module over training, "
    "one row per input source.",
)
def activation_stats(group: RunGroup):
    df = group.scalars(PROBE)
    if df.empty:
        return None
    df = _split(df)
    df = df.assign(x=trained_epochs(df))
    sources = [s for s in SOURCES if s in set(df["source"])]
    fig, axes, colors = layer_figure(group, df, len(sources), len(PANELS), (4.2, 3.0))
    for r, source in enumerate(sources):
        for c, (metric, title, log) in enumerate(PANELS):
            ax = axes[r, c]
            part = df[(df["source"] == source) & (df["metric"] == metric)]
            stats_panel(ax, part, colors, group.n, f"{title} — {source}", log)
            if metric.endswith("_frac"):
                ax.yaxis.set_major_formatter(PercentFormatter(1.0))
            if r == len(sources) - 1:
                ax.set_xlabel("epochs trained")
    layer_legend(fig, axes[0, 0], group, "module", log=True)
    fig.suptitle(f"Feature statistics — {group.title}")
    return fig
