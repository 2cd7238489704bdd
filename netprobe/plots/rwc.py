"""Relative Weight Change: per-layer curves over epochs (mean ± std over seeds), layer × epoch."""

from __future__ import annotations

import numpy as np
from matplotlib.colors import LogNorm, Normalize

from netprobe.plots.common import (
    RunGroup,
    figure,
    layer_bands,
    layer_colors,
    layer_legend,
    new_figure,
    positive,
    short,
    step_axis,
    whole_numbers,
)

PROBE = "rwc"


def _mode(group: RunGroup) -> str:
    return group.probe_config(PROBE).get("mode", "l1")


def _formula(mode: str) -> str:
    if mode == "elementwise":
        return r"mean$_i\ |\Delta W_i|\,/\,|W_{e-1,i}|$"
    return r"$\|W_e - W_{e-1}\|_1 / \|W_{e-1}\|_1$"


def _finite(df):
    return df[np.isfinite(df["value"])]


@figure(
    "rwc_curves",
    "Relative weight change of each layer per epoch, one line per layer in forward order "
    "(log scale).",
)
def rwc_curves(group: RunGroup):
    df = _finite(group.scalars(PROBE, "rwc"))
    if df.empty:
        return None
    steps = _finite(group.scalars(PROBE, "rwc_step"))
    colors = layer_colors(group.ordered(df["layer"]))
    panels = 2 if not steps.empty else 1
    fig, axes = new_figure(1, panels, size=(6.4, 4.4))
    ax = axes[0, 0]
    log = positive(df["value"])
    layer_bands(ax, df.assign(x=df["epoch"] + 1), colors, group.n, markers_upto=30, log=log)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"RWC  {_formula(_mode(group))}")
    ax.xaxis.set_major_locator(whole_numbers())
    ax.grid(alpha=0.3, which="both")
    ax.set_title("per epoch, against the weights one epoch before")
    if not steps.empty:
        k = group.probe_config(PROBE).get("every_steps")
        ax2 = axes[0, 1]
        x = steps["step"] + 1
        log2 = positive(steps["value"])
        layer_bands(ax2, steps.assign(x=x), colors, group.n, labels=False, markers_upto=0, log=log2)
        step_axis(ax2, "optimizer steps done")
        ax2.set_title(f"every {k} steps, against the weights {k} steps before")
        ax2.grid(alpha=0.3, which="both")
    layer_legend(fig, ax, group, log=log)
    fig.suptitle(f"Relative weight change — {group.title}")
    return fig


@figure(
    "rwc_heatmap",
    "Relative weight change, layer (forward order) × epoch (log colour scale).",
)
def rwc_heatmap(group: RunGroup):
    df = _finite(group.scalars(PROBE, "rwc"))
    if df.empty:
        return None
    layers = group.ordered(df["layer"])
    table = df.pivot_table(index="layer", columns="epoch", values="value", aggfunc="mean")
    table = table.reindex(layers)
    values = table.to_numpy(dtype=float)
    epochs = table.columns.to_numpy() + 1
    fig, axes = new_figure(
        size=(float(np.clip(0.35 * len(epochs) + 4.5, 6.4, 16)), max(3.0, 0.32 * len(layers) + 1.8))
    )
    ax = axes[0, 0]
    positive = values[np.isfinite(values) & (values > 0)]
    norm = (
        LogNorm(vmin=positive.min(), vmax=positive.max())
        if positive.size and positive.max() > positive.min()
        else Normalize()
    )
    image = ax.imshow(
        np.ma.masked_invalid(values),
        aspect="auto",
        interpolation="nearest",
        cmap="viridis",
        norm=norm,
        extent=(epochs[0] - 0.5, epochs[-1] + 0.5, len(layers) - 0.5, -0.5),
    )
    if values.size <= 200:  # few enough cells to print each value
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                if np.isfinite(values[i, j]):
                    shade = norm(values[i, j])
                    ax.text(
                        epochs[j],
                        i,
                        f"{values[i, j]:.2g}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="black" if shade > 0.6 else "white",
                    )
    ax.set_yticks(range(len(layers)), [short(n, 36) for n in layers], fontsize=8)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(whole_numbers())
    ax.set_ylabel("layer (forward order)")
    seeds = f", mean over {group.n} seeds" if group.n > 1 else ""
    ax.set_title(f"Relative weight change — {group.title}{seeds}", fontsize=10)
    fig.colorbar(image, ax=ax, label=f"RWC  {_formula(_mode(group))}")
    return fig
