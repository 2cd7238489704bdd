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
    layer_figure,
    layer_legend,
    new_figure,
    short,
    stats_panel,
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
# Sign-map codes (probes/optim_dynamics.py): −1 small negative, 0 exact zero, +1 small positive,
# 2 large; a missing or non-finite gradient is drawn in MISSING.
SIGN_COLORS = ListedColormap(["#d62728", "#252525", "#2ca02c", "#f3f3f3"])
SIGN_NORM = BoundaryNorm([-1.5, -0.5, 0.5, 1.5, 2.5], SIGN_COLORS.N)
MISSING = "#9ecae1"
ZOOM = 64  # rows and columns at most in the zoomed view


def _thresholds(group: RunGroup) -> dict[str, Any]:
    cfg = group.probe_config(PROBE)
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
    # Per run first (mean over the epoch's steps), then mean and std over runs.
    per_run = df.groupby(["metric", "layer", "epoch", "run"])["value"].mean().reset_index()
    per_run["x"] = per_run["epoch"] + 1
    thresholds = _thresholds(group)
    fig, axes, colors = layer_figure(group, df, 2, 5, (3.5, 3.1))
    for ax, (metric, title, log) in zip(axes.flat, PANELS):
        ax.set_xlabel("epoch")
        part = per_run[per_run["metric"] == metric]
        if part.empty:
            ax.set_title(title.format(**thresholds), fontsize=9)
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
            continue
        stats_panel(ax, part, colors, group.n, title.format(**thresholds), log)
    layer_legend(fig, axes.flat[0], group, log=True)
    fig.suptitle(f"Optimization dynamics — {group.title}")
    return fig


def sign_matrix(
    sign_map: pd.DataFrame, layers: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """Stack one run's `sign_map` (per tensor and epoch a [steps, K] block, the steps in
    `sign_steps`) into captures × (layers · K): codes, the step and the epoch of each row, K per
    layer. A layer missing at a step is left NaN."""
    steps_of = {
        int(s): np.asarray(v, dtype=np.int64)
        for s, v in zip(
            sign_map.loc[sign_map["name"] == "sign_steps", "step"],
            sign_map.loc[sign_map["name"] == "sign_steps", "values"],
        )
    }
    blocks = sign_map[sign_map["name"] == "sign_map"]
    rows: dict[int, int] = {}  # optimizer step → epoch
    pieces = []
    for step, epoch, layer, shape, values in zip(
        blocks["step"], blocks["epoch"], blocks["row"], blocks["shape"], blocks["values"]
    ):
        values = np.asarray(values, dtype=float).reshape(-1, shape[-1])
        # One row per stored step; a run from before per-step rows has one row, its capture step.
        at = steps_of.get(int(step), np.array([step]))[: len(values)]
        pieces.append((layer, at, values))
        rows.update(dict.fromkeys(at.tolist(), int(epoch)))
    steps = np.array(sorted(rows), dtype=np.int64)
    widths = [max((v.shape[1] for n, _, v in pieces if n == layer), default=0) for layer in layers]
    starts = dict(zip(layers, np.concatenate([[0], np.cumsum(widths)])))
    out = np.full((len(steps), int(sum(widths))), np.nan)
    row_of = {s: i for i, s in enumerate(steps.tolist())}
    for layer, at, values in pieces:
        if layer in starts:
            c = starts[layer]
            out[[row_of[s] for s in at.tolist()], c : c + values.shape[1]] = values
    return out, steps, np.array([rows[s] for s in steps.tolist()]), widths


def _sign_data(group: RunGroup):
    df = group.runs[0].matrices(PROBE)
    df = df[df["name"].isin(["sign_map", "sign_steps"])]
    if df.empty or not (df["name"] == "sign_map").any():
        return None
    layers = group.ordered(df.loc[df["name"] == "sign_map", "row"])
    codes, steps, epochs, widths = sign_matrix(df, layers)
    return codes, steps, epochs, widths, layers, group.seed_note


def _sign_legend(ax, zero: float, codes: np.ndarray) -> None:
    """One patch per code, each with its share of the drawn cells."""
    cells = max(codes.size, 1)
    share = lambda c: f"{np.count_nonzero(codes == c) / cells:.1%}"  # noqa: E731
    handles = [
        Patch(facecolor="#2ca02c", label=f"small positive 0 < g ≤ {zero:g}  ({share(1)})"),
        Patch(facecolor="#d62728", label=f"small negative −{zero:g} ≤ g < 0  ({share(-1)})"),
        Patch(facecolor="#252525", label=f"exactly zero g = 0  ({share(0)})"),
        Patch(facecolor="#f3f3f3", edgecolor="0.6", label=f"large |g| > {zero:g}  ({share(2)})"),
    ]
    if np.isnan(codes).any():
        handles.append(Patch(facecolor=MISSING, label="not recorded / not finite"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.07, 1.0), fontsize=8,
              title="gradient g of the sampled weight", title_fontsize=8)  # fmt: skip


def _draw_codes(ax, codes: np.ndarray, steps: np.ndarray, epochs: np.ndarray, grid: bool) -> None:
    """Rows top to bottom in step order, labelled with their optimizer step; a line and a label
    where each epoch begins (epochs counted from 1)."""
    cmap = SIGN_COLORS.with_extremes(bad=MISSING)
    x = np.arange(codes.shape[1] + 1)
    y = np.arange(len(steps) + 1)
    ax.pcolormesh(
        x,
        y,
        np.ma.masked_invalid(codes),
        cmap=cmap,
        norm=SIGN_NORM,
        edgecolors="0.8" if grid else "face",
        linewidth=0.3 if grid else 0,
    )
    ax.set_ylim(y[-1], y[0])  # first step at the top
    ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 12)).round().astype(int))
    ax.set_yticks(ticks + 0.5, [str(int(steps[i])) for i in ticks], fontsize=7)
    ax.set_ylabel("optimizer step")
    starts = np.flatnonzero(np.diff(epochs)) + 1
    for i in starts:
        ax.axhline(i, color="tab:blue", lw=1.0)
    for i in np.concatenate([[0], starts]):
        ax.annotate(f"epoch {int(epochs[i]) + 1}", (1.0, i), xycoords=("axes fraction", "data"),
                    xytext=(3, -1), textcoords="offset points", va="top", fontsize=7,
                    color="tab:blue", annotation_clip=False)  # fmt: skip


@figure(
    "grad_sign_map",
    "Gradient of K sampled weights per layer at evenly spaced steps of each epoch: small "
    "positive (green), small negative (red), exactly zero (black, dead units) and large (light).",
    averages=False,
)
def grad_sign_map(group: RunGroup):
    data = _sign_data(group)
    if data is None:
        return None
    codes, steps, epochs, widths, layers, which = data
    zero = _thresholds(group)["zero"]
    fig, axes = new_figure(
        size=(
            float(np.clip(codes.shape[1] * 0.012 + 6, 9, 20)),
            float(np.clip(0.06 * len(steps) + 3.2, 4.2, 11)),
        )
    )
    ax = axes[0, 0]
    _draw_codes(ax, codes, steps, epochs, grid=False)
    bounds = np.cumsum(widths)
    for b in bounds[:-1]:
        ax.axvline(b, color="white", lw=1.5)
    centers = bounds - np.asarray(widths) / 2
    ax.set_xticks(centers, [short(n, 22) for n in layers], rotation=45, ha="right", fontsize=7)
    ax.set_xlabel(f"sampled weights, grouped by layer in forward order ({max(widths)} per layer)")
    _sign_legend(ax, zero, codes)
    ax.set_title(
        f"Layer-wise gradient signs, {len(steps)} steps — {group.title}, {which}", fontsize=10
    )
    return fig


def zoom_window(codes: np.ndarray, widths: list[int], rows: int = ZOOM) -> tuple[int, slice]:
    """The layer whose sampled gradients are most often small (±, not zero or large) and the
    window of at most `rows` consecutive captures where they are most often so."""
    starts = np.concatenate([[0], np.cumsum(widths)])
    small = np.abs(np.nan_to_num(codes, nan=2.0)) == 1
    per_layer = [small[:, a:b].sum() for a, b in zip(starts, starts[1:])]
    i = int(np.argmax(per_layer))
    per_row = small[:, starts[i] : starts[i + 1]].sum(axis=1)
    if len(per_row) <= rows:
        return i, slice(0, len(per_row))
    sums = np.convolve(per_row, np.ones(rows), mode="valid")
    first = int(np.argmax(sums))
    return i, slice(first, first + rows)


@figure(
    "grad_sign_map_zoom",
    "Zoom of the gradient sign map: the layer whose sampled gradients are most often small, over "
    "the window of at most 64 steps where they are, one cell per weight and step.",
    averages=False,
)
def grad_sign_map_zoom(group: RunGroup):
    data = _sign_data(group)
    if data is None:
        return None
    codes, steps, epochs, widths, layers, which = data
    i, window = zoom_window(codes, widths)
    start = int(np.sum(widths[:i]))
    block = codes[window, start : start + min(widths[i], ZOOM)]
    zero = _thresholds(group)["zero"]
    fig, axes = new_figure(
        size=(
            float(np.clip(0.13 * block.shape[1] + 4.5, 7, 14)),
            float(np.clip(0.13 * block.shape[0] + 2.4, 3.6, 11)),
        )
    )
    ax = axes[0, 0]
    _draw_codes(ax, block, steps[window], epochs[window], grid=True)
    ax.set_xlabel(f"sampled weight of {short(layers[i], 40)} ({block.shape[1]} of {widths[i]})")
    _sign_legend(ax, zero, block)
    ax.set_title(
        f"Gradient signs of {short(layers[i], 40)}, steps {steps[window][0]}–{steps[window][-1]}\n"
        f"{group.title}, {which}",
        fontsize=10,
    )
    return fig
