"""Augmentation: feature × feature and sample × sample correlations, and the augmented inputs."""

from __future__ import annotations

import numpy as np
import pandas as pd

from netprobe.plots.common import RunGroup, figure, new_figure, short
from netprobe.plots.correlation import CORR_CMAP, epochs_done, when

PROBE = "augmentation"


def _latest_capture(group: RunGroup, name: str | None = None):
    """The first run's matrices of its last capture, the run, and a phrase naming both."""
    run = group.runs[0]
    df = run.matrices(PROBE, name)
    if df.empty:
        return None
    step = df["step"].max()
    df = df[df["step"] == step]
    x = epochs_done([step], [df["epoch"].iloc[0]])[0]
    return df, run, f"{when(x)}, {group.seed_note}"


def _block(df: pd.DataFrame, name: str, row: str) -> np.ndarray | None:
    hit = df[(df["name"] == name) & (df["row"] == row)]
    if hit.empty:
        return None
    return np.asarray(hit["values"].iloc[0]).reshape(hit["shape"].iloc[0])


@figure(
    "augmentation_correlations",
    "Pearson correlations under random affine augmentation of one validation sample, for the "
    "first and the last tracked layer: between features across augmentations (left) and between "
    "augmentations across features (right); invariance = feature variance across augmentations "
    "/ across the probe batch. Each panel's colour scale spans its own off-diagonal values.",
    averages=False,
)
def augmentation_correlations(group: RunGroup):
    found = _latest_capture(group)
    if found is None:
        return None
    df, run, phrase = found
    corr = df[df["name"].isin(["feature_corr", "sample_corr"])]
    if corr.empty:
        return None
    layers = group.ordered(corr["row"])
    scalars = run.scalars(PROBE, "invariance")
    scalars = scalars[scalars["step"] == df["step"].iloc[0]]
    inv = dict(zip(scalars["layer"], scalars["value"]))
    fig, axes = new_figure(len(layers), 2, size=(5.0, 4.2))
    for i, layer in enumerate(layers):
        kind = "first" if i == 0 else "last"
        score = f", invariance {inv[layer]:.3f}" if layer in inv else ""
        for j, (name, what, unit) in enumerate(
            [
                ("feature_corr", "features × features", "feature"),
                ("sample_corr", "augmentations × augmentations", "augmentation"),
            ]
        ):
            ax = axes[i, j]
            block = _block(corr, name, layer)
            if block is None:
                ax.axis("off")
                continue
            off = block[~np.eye(*block.shape, dtype=bool)] if block.shape[0] > 1 else block
            cmap, vmin, vmax = data_scale(off)
            image = ax.imshow(
                block, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest", aspect="equal"
            )
            fig.colorbar(image, ax=ax, shrink=0.8, label="Pearson r")
            mean = f", mean off-diagonal r = {np.nanmean(off):.3f}"
            ax.set_title(f"{kind} layer {short(layer, 24)}{score}\n{what}{mean}", fontsize=9)
            ax.set_xlabel(f"{unit} ({block.shape[1]})", fontsize=8)
            ax.set_ylabel(f"{unit} ({block.shape[0]})", fontsize=8)
            ax.tick_params(labelsize=7)
    n = group.probe_config(PROBE).get("samples")
    count = f"{n} augmentations" if n else "augmentations"
    fig.suptitle(f"Features under augmentation ({count}) — {group.title}\n{phrase}", fontsize=10)
    return fig


def data_scale(values: np.ndarray) -> tuple[str, float, float]:
    """A colour scale for correlations spanning the 1st to 99th percentile of `values`: diverging
    around 0 when they take both signs, sequential when (as under augmentation) all are alike."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return CORR_CMAP, -1.0, 1.0
    lo, hi = (float(q) for q in np.percentile(finite, [1, 99]))
    if lo < 0 < hi:
        peak = max(-lo, hi)
        return CORR_CMAP, -peak, peak
    if hi - lo < 1e-6:
        lo, hi = lo - 0.01, hi + 0.01
    return "viridis", lo, hi


def to_images(stack: np.ndarray, low: float, high: float) -> list[np.ndarray]:
    """[n, C, H, W] as displayable images scaled jointly to [0, 1]: RGB for 3 channels, else the
    channel mean in grey."""
    scaled = np.clip((stack - low) / max(high - low, 1e-12), 0, 1)
    if scaled.shape[1] == 3:
        return list(scaled.transpose(0, 2, 3, 1))
    return list(scaled.mean(axis=1))


@figure(
    "augmentation_inputs",
    "The validation sample (top left, framed) and the first stored random affine augmentations "
    "of it that the augmentation probe fed to the network.",
    averages=False,
)
def augmentation_inputs(group: RunGroup):
    found = _latest_capture(group)
    if found is None:
        return None
    df, _, phrase = found
    original, inputs = _block(df, "original", ""), _block(df, "inputs", "")
    if original is None or inputs is None:
        return None
    stack = np.concatenate([original[None], inputs])
    # Shared scaling: all images in the same intensity units as the (normalized) original.
    images = to_images(stack, float(stack.min()), float(stack.max()))
    cols = int(np.ceil(np.sqrt(len(images))))
    rows = int(np.ceil(len(images) / cols))
    fig, axes = new_figure(rows, cols, size=(1.6, 1.7))
    cfg = group.probe_config(PROBE)
    for k, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if k >= len(images):
            ax.axis("off")
            continue
        ax.imshow(images[k], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        if k == 0:
            ax.set_title("original", fontsize=8)
            for spine in ax.spines.values():
                spine.set_edgecolor("tab:red")
                spine.set_linewidth(2)
        else:
            ax.set_title(f"#{k}", fontsize=7)
    ranges = (
        f"rotation ±{cfg.get('rotation', 15)}°, translate ±{cfg.get('translate', 0.1):.0%}, "
        f"scale {cfg.get('scale', [0.9, 1.1])}"
    )
    fig.suptitle(f"Augmented inputs ({ranges})\n{group.title}, {phrase}", fontsize=9)
    return fig
