"""Optimization dynamics: per-epoch curves of each metric, the gradient sign map and its zoom."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.patches import Patch

from netprobe.plots.common import (
    RunGroup,
    figure,
    layer_bands,
    layer_colors,
    layer_legend,
    new_figure,
    short,
)

PROBE = "optim_dynamics"
# metric, panel title ({zero} and {tiny} are the run's thresholds), log scale
PANELS = [
    ("zero_frac_1e7", "fraction with |g| ≤ {tiny}", False),
    ("zero_frac", "zero gradients: fraction |g| ≤ {zero}", False),
    ("released_frac", "released: zero → nonzero\n(fraction of previous zeros)", False),
    ("retained_frac", "retained: zero → zero\n(fraction of previous zeros)", False),
    ("flip_frac", "sign flips among retained", False),
    ("flip_frac_all", "sign flips, all weights", False),
    ("wdiff_l2", r"update size $\|W_t - W_{{t-1}}\|_2$", True),
    ("wdiff_retained", r"mean $|W_t - W_{{t-1}}|$ over retained", True),
    ("local_min", "local minima (count):\nretained flips with ΔW·Δg > 0", False),
    ("local_max", "local maxima (count):\nretained flips with ΔW·Δg < 0", False),
]
SIGN_COLORS = ListedColormap(["#d62728", "white", "#2ca02c"])
SIGN_NORM = BoundaryNorm([-1.5, -0.5, 0.5, 1.5], SIGN_COLORS.N)


def _thresholds(group: RunGroup) -> dict[str, Any]:
    cfg = ((group.runs[0].config or {}).get("probes") or {}).get(PROBE) or {}
    return {"zero": cfg.get("zero_threshold", 1e-5), "tiny": cfg.get("tiny_threshold", 1e-7)}


@figure(
    "optim_dynamics_curves",
    "Zero-gradient, sign-flip and update statistics per epoch (mean over the epoch's steps), "
    "one line per layer.",
)
def optim_dynamics_curves(group: RunGroup):
    df = group.scalars(PROBE)
    if df.empty:
        return None
    colors = layer_colors(group.ordered(df["layer"]))
    # Per run first (mean over the epoch's steps), then mean and std over runs.
    per_run = df.groupby(["metric", "layer", "epoch", "run"])["value"].mean().reset_index()
    per_run["x"] = per_run["epoch"] + 1
    thresholds = _thresholds(group)
    fig, axes = new_figure(2, 5, size=(3.5, 3.1))
    for ax, (metric, title, log) in zip(axes.flat, PANELS):
        ax.set_title(title.format(**thresholds), fontsize=9)
        ax.set_xlabel("epoch")
        part = per_run[per_run["metric"] == metric]
        if part.empty:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
            continue
        layer_bands(ax, part, colors, group.n)
        if log and (part["value"] > 0).all():
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    layer_legend(fig, axes.flat[0], group)
    fig.suptitle(f"Optimization dynamics — {group.title}")
    return fig


def sign_matrix(
    sign_map: pd.DataFrame, layers: list[str]
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Stack one run's `sign_map` rows into epochs × (layers · K): codes, epochs, K per layer.

    A layer missing from an epoch is left NaN (drawn grey).
    """
    epochs = np.sort(sign_map["epoch"].unique())
    widths = [
        int(max((len(v) for v in sign_map.loc[sign_map["row"] == layer, "values"]), default=0))
        for layer in layers
    ]
    starts = np.concatenate([[0], np.cumsum(widths)])
    out = np.full((len(epochs), int(starts[-1])), np.nan)
    row_of = {e: i for i, e in enumerate(epochs)}
    col_of = dict(zip(layers, starts[:-1]))
    for epoch, layer, values in zip(sign_map["epoch"], sign_map["row"], sign_map["values"]):
        if layer in col_of:
            c = col_of[layer]
            out[row_of[epoch], c : c + len(values)] = values
    return out, epochs, widths


def _sign_data(group: RunGroup):
    run = group.runs[0]
    df = run.matrices(PROBE, "sign_map")
    if df.empty:
        return None
    layers = group.ordered(df["row"])
    codes, epochs, widths = sign_matrix(df, layers)
    return codes, epochs, widths, layers, group.seed_note


def _sign_legend(ax, zero: float) -> None:
    handles = [
        Patch(facecolor="#2ca02c", label=f"0 < g ≤ {zero:g}"),
        Patch(facecolor="#d62728", label=f"−{zero:g} ≤ g < 0"),
        Patch(facecolor="white", edgecolor="0.6", label=f"|g| > {zero:g} or g = 0"),
    ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)


def _draw_codes(ax, codes: np.ndarray, epochs: np.ndarray, grid: bool = False) -> None:
    masked = np.ma.masked_invalid(codes)
    cmap = SIGN_COLORS.with_extremes(bad="0.85")
    x = np.arange(codes.shape[1] + 1)
    y = np.arange(len(epochs) + 1) + 0.5
    ax.pcolormesh(
        x,
        y,
        masked,
        cmap=cmap,
        norm=SIGN_NORM,
        edgecolors="0.85" if grid else "face",
        linewidth=0.3 if grid else 0,
    )
    ax.set_ylim(y[-1], y[0])  # first epoch at the top
    ax.set_ylabel("epoch")
    # Rows are numbered 1..E in the order stored; label them with the real epoch.
    step = max(1, len(epochs) // 12)
    ticks = np.arange(0, len(epochs), step)
    ax.set_yticks(ticks + 1, [str(int(epochs[i]) + 1) for i in ticks])


@figure(
    "grad_sign_map",
    "Sign of small gradients at the end of each epoch for K sampled weights per layer: "
    "green 0 < g ≤ threshold, red −threshold ≤ g < 0, white otherwise.",
)
def grad_sign_map(group: RunGroup):
    data = _sign_data(group)
    if data is None:
        return None
    codes, epochs, widths, layers, which = data
    zero = _thresholds(group)["zero"]
    fig, axes = new_figure(
        size=(
            float(np.clip(codes.shape[1] * 0.012 + 5, 8, 20)),
            float(np.clip(0.22 * len(epochs) + 2.8, 3.6, 10)),
        )
    )
    ax = axes[0, 0]
    _draw_codes(ax, codes, epochs)
    bounds = np.cumsum(widths)
    for b in bounds[:-1]:
        ax.axvline(b, color="black", lw=0.8)
    centers = bounds - np.asarray(widths) / 2
    ax.set_xticks(centers, [short(n, 22) for n in layers], rotation=45, ha="right", fontsize=7)
    ax.set_xlabel(f"sampled gradient entries, grouped by layer ({max(widths)} per layer)")
    _sign_legend(ax, zero)
    ax.set_title(f"Layer-wise gradient signs — {group.title}, {which}", fontsize=10)
    return fig


@figure(
    "grad_sign_map_zoom",
    "Zoom of the gradient sign map on the layer whose sampled gradients are most often near zero.",
)
def grad_sign_map_zoom(group: RunGroup):
    data = _sign_data(group)
    if data is None:
        return None
    codes, epochs, widths, layers, which = data
    starts = np.concatenate([[0], np.cumsum(widths)])
    active = [np.count_nonzero(np.nan_to_num(codes[:, a:b])) for a, b in zip(starts, starts[1:])]
    i = int(np.argmax(active))
    block = codes[:, starts[i] : starts[i + 1]]
    zero = _thresholds(group)["zero"]
    fig, axes = new_figure(
        size=(
            float(np.clip(0.16 * block.shape[1] + 3, 6, 16)),
            float(np.clip(0.25 * len(epochs) + 2.6, 3.4, 10)),
        )
    )
    ax = axes[0, 0]
    _draw_codes(ax, block, epochs, grid=True)
    ax.set_xlabel(f"sampled entry of {layers[i]} (index among its {block.shape[1]} samples)")
    _sign_legend(ax, zero)
    near = active[i] / max(block.size, 1)
    ax.set_title(
        f"Gradient signs, zoom on {short(layers[i], 40)} ({near:.0%} of cells near zero)\n"
        f"{group.title}, {which}",
        fontsize=10,
    )
    return fig
