"""Layer correlations: grid of C_ij, corr_mean and CKA heatmaps, corr_mean over epochs."""

from __future__ import annotations

from collections.abc import Iterable

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes

from netprobe.plots.common import (
    RunGroup,
    epoch_suffix,
    figure,
    layer_colors,
    mean_band,
    new_figure,
    reveal_coinciding,
    short,
    whole_numbers,
)

PROBE = "correlation"
# Correlations are signed: a diverging map centred at 0, red positive, blue negative.
CORR_CMAP = "RdBu_r"
MAX_ANNOTATED = 12  # heatmaps with more layers than this get no numbers in their cells


def epochs_done(steps: Iterable[int], epochs: Iterable[int]) -> list[int]:
    """Epochs completed at each capture: 0 before the first step, e + 1 after epoch e (every
    capture, `end` ones too, stores the 0-based epoch it follows)."""
    return [0 if step == 0 else int(epoch) + 1 for step, epoch in zip(steps, epochs)]


def with_epochs(df: pd.DataFrame) -> pd.DataFrame:
    """`df` (with a `run` column) plus `x`: the epochs completed at each of its captures."""
    return df.assign(x=epochs_done(df["step"], df["epoch"]))


def when(x: int) -> str:
    return "before training" if x == 0 else f"after epoch {x}"


def layer_labels(group: RunGroup, names: list[str], width: int = 22) -> list[str]:
    """Module names with their type (`net.1 · Linear`), for axis labels."""
    layers = group.runs[0].layers()
    kinds = dict(zip(layers["module"], layers["type"]))
    return [f"{short(n, width)} · {kinds[n]}" if n in kinds else short(n, width) for n in names]


def pair_matrix(rows: pd.DataFrame, names: list[str]) -> np.ndarray:
    """L × L from one value per (row, col) pair recorded for i ≤ j, mirrored; NaN where missing."""
    index = {n: i for i, n in enumerate(names)}
    out = np.full((len(names), len(names)), np.nan)
    for row, col, values in zip(rows["row"], rows["col"], rows["values"]):
        if row in index and col in index:
            out[index[row], index[col]] = out[index[col], index[row]] = float(values[0])
    return out


def heatmap(
    ax: Axes, values: np.ndarray, labels: list[str], cmap: str, vmin: float, vmax: float
) -> matplotlib.image.AxesImage:
    """A layer × layer heatmap, first layer top left; cells annotated when there are few."""
    image = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ticks = np.arange(len(labels))
    fontsize = 8 if len(labels) <= 12 else 6
    ax.set_xticks(ticks, labels, rotation=45, ha="right", fontsize=fontsize)
    ax.set_yticks(ticks, labels, fontsize=fontsize)
    if len(labels) <= MAX_ANNOTATED:
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                r, g, b, _ = image.cmap(image.norm(v))
                dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")  # fmt: skip
    return image


def _pair_values(group: RunGroup, name: str) -> pd.DataFrame | None:
    df = group.matrices(PROBE, name)
    if df.empty:
        return None
    return with_epochs(df)


def _pair_heatmaps(group: RunGroup, name: str, title: str, caption: str, vmax: float | None):
    """First and last capture side by side, mean over the group's runs; `vmax` None: data max."""
    df = _pair_values(group, name)
    if df is None:
        return None
    names = group.ordered(pd.concat([df["row"], df["col"]]))
    labels = layer_labels(group, names)
    first, last = df["x"].min(), df["x"].max()
    shown = [first] if first == last else [first, last]
    panels = []
    for x in shown:
        part = df[df["x"] == x]
        per_run = [pair_matrix(part[part["run"] == r], names) for r in sorted(part["run"].unique())]
        panels.append((x, np.nanmean(np.stack(per_run), axis=0), len(per_run)))
    if vmax is None:
        top = max(float(np.nanmax(m)) if np.isfinite(m).any() else 0.0 for _, m, _ in panels)
        vmax = max(top, 1e-3)
    size = max(4.2, 0.5 * len(names) + 2.2)
    fig, axes = new_figure(1, len(shown), size=(size + 0.6, size))
    image = None
    for ax, (x, mean, runs) in zip(axes.flat, panels):
        image = heatmap(ax, mean, labels, "viridis", 0.0, vmax)
        of_runs = f", mean of {runs} runs" if runs > 1 else ""
        ax.set_title(f"{when(x)}{of_runs}", fontsize=10)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label=caption)
    fig.suptitle(f"{title} — {group.title}", fontsize=11)
    return fig


@figure(
    "corr_mean_heatmap",
    "Mean positive Pearson correlation, mean(max(C_ij, 0)), between the features of every pair "
    "of layers (the diagonal: within a layer, self-pairs left out); first and last capture.",
)
def corr_mean_heatmap(group: RunGroup):
    return _pair_heatmaps(
        group, "corr_mean", "Mean positive feature correlation", "mean(max(C_ij, 0))", None
    )


@figure(
    "cka_heatmap",
    "Linear CKA between the representations of every pair of layers on the probe batch, with the "
    "biased HSIC estimator (reads high when features outnumber samples); first and last capture.",
)
def cka_heatmap(group: RunGroup):
    return _pair_heatmaps(
        group, "cka", "Linear CKA between layers, biased HSIC", "linear CKA (biased)", 1.0
    )


@figure(
    "cka_unbiased_heatmap",
    "Linear CKA between every pair of layers with the unbiased HSIC estimator (Song et al. 2012; "
    "about 0 for unrelated layers, may dip below it); first and last capture.",
)
def cka_unbiased_heatmap(group: RunGroup):
    return _pair_heatmaps(
        group,
        "cka_unbiased",
        "Linear CKA between layers, unbiased HSIC",
        "linear CKA (unbiased)",
        1.0,
    )


@figure(
    "corr_mean_evolution",
    "Mean positive feature correlation over epochs: within each layer (left) and between each "
    "layer and the next (right); epoch 0 is before training.",
)
def corr_mean_evolution(group: RunGroup):
    df = _pair_values(group, "corr_mean")
    if df is None:
        return None
    names = group.ordered(pd.concat([df["row"], df["col"]]))
    colors = layer_colors(names)
    fig, axes = new_figure(1, 2, size=(5.6, 4.2))
    panels = [
        (axes[0, 0], [(n, n) for n in names], "within a layer"),
        (axes[0, 1], list(zip(names[:-1], names[1:])), "between consecutive layers"),
    ]
    markers_upto = 30 if df["x"].nunique() <= 30 else 0  # dots on every curve or on none
    for ax, pairs, title in panels:
        for a, b in pairs:
            part = df[(df["row"] == a) & (df["col"] == b)]
            if part.empty:
                continue
            value = part["values"].map(lambda v: float(v[0]))
            label = short(a) if a == b else f"{short(a, 14)} → {short(b, 14)}"
            mean_band(ax, part.assign(value=value), "x", group.n, label, colors[a], markers_upto)
        reveal_coinciding(ax)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch (0 = before training)")
        ax.set_ylabel("mean(max(C, 0))")
        ax.xaxis.set_major_locator(whole_numbers())
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, title="forward order", title_fontsize=7)
    fig.suptitle(f"Feature correlation over training — {group.title}", fontsize=11)
    return fig


@figure(
    "correlation_grid",
    "Pearson correlation C_ij between every feature of layer i (rows) and of layer j (columns), "
    "for layers i ≤ j in forward order; one figure per capture that kept the full matrices.",
)
def correlation_grid(group: RunGroup):
    run = group.runs[0]
    df = run.matrices(PROBE, "C")
    if df.empty:
        return None
    df = df.assign(x=epochs_done(df["step"], df["epoch"]))
    names = group.ordered(pd.concat([df["row"], df["col"]]))
    which = f", {group.seed_note}"
    figures = {}
    for x in sorted(df["x"].unique()):
        suffix = "start" if x == 0 else epoch_suffix(x)
        figures[suffix] = _grid(group, df[df["x"] == x], names, when(x), which)
    return figures


def _grid(group: RunGroup, part: pd.DataFrame, names: list[str], when: str, which: str):
    """Every block C_ij (i ≤ j) in one Axes, block (i, j) in the unit cell of row i and column j:
    one Axes instead of one per pair keeps deep models (hundreds of pairs) quick to draw."""
    n = len(names)
    blocks = {
        (row, col): np.asarray(values).reshape(shape)
        for row, col, shape, values in zip(part["row"], part["col"], part["shape"], part["values"])
    }
    sizes = {}
    for (row, col), block in blocks.items():
        sizes[row], sizes[col] = block.shape
    cell = float(np.clip(14 / n, 0.55, 2.4))
    fig, axes = new_figure(1, 1, size=(cell * n + 3.2, cell * n + 2.0))
    ax = axes[0, 0]
    gap = 0.03  # white space between blocks, in cells
    image = None
    for i, a in enumerate(names):
        for j, b in enumerate(names[i:], start=i):
            block = blocks.get((a, b))
            if block is None:
                continue
            extent = (j + gap, j + 1 - gap, i + 1 - gap, i + gap)
            image = ax.imshow(
                block, cmap=CORR_CMAP, vmin=-1, vmax=1, extent=extent, interpolation="nearest"
            )
    ax.set_xlim(0, n)
    ax.set_ylim(n, 0)
    ax.set_aspect("equal")
    for side in ax.spines.values():
        side.set_visible(False)
    labels = [f"{short(name, 22)} ({sizes[name]})" if name in sizes else short(name, 22)
              for name in names]  # fmt: skip
    centres = np.arange(n) + 0.5
    fontsize = 8 if n <= 12 else 7
    ax.xaxis.tick_top()
    ax.set_xticks(
        centres, labels, rotation=60, ha="left", rotation_mode="anchor", fontsize=fontsize
    )
    ax.set_yticks([])
    ax.tick_params(length=0)
    for i, label in enumerate(labels):  # row names along the diagonal, in the empty triangle
        ax.text(i - 0.1, i + 0.5, label, ha="right", va="center", fontsize=fontsize)
    ax.xaxis.set_label_position("top")
    ax.set_xlabel("layer j (columns of its blocks)", fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=ax, shrink=0.6, label="Pearson correlation")
    fig.suptitle(
        f"Feature correlations C_ij, {when} — {group.title}{which}\n"
        "block (i, j): features of layer i (rows, named along the diagonal) × features of "
        "layer j (columns, named on top); feature count in brackets",
        fontsize=10,
    )
    return fig
