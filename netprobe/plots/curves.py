"""Training curves: loss and accuracy per step, validation per epoch."""

from __future__ import annotations

import numpy as np

from netprobe.plots.common import (
    RunGroup,
    band,
    compact_ticks,
    figure,
    log_worthy,
    mean_std,
    new_figure,
    smooth,
    step_axis,
)

PANELS = [
    ("loss", "train loss", "step"),
    ("acc", "train accuracy", "step"),
    ("val_loss", "validation loss", "epoch"),
    ("val_acc", "validation accuracy", "epoch"),
]


@figure(
    "training_curves",
    "Training loss and accuracy per step (smoothed) and validation per epoch (epochs counted "
    "from 1); loss on a log axis when it spans more than two decades.",
)
def training_curves(group: RunGroup):
    df = group.scalars("train")
    if df.empty:
        return None
    fig, axes = new_figure(2, 2, size=(5.2, 3.4))
    for ax, (metric, title, x) in zip(axes.flat, PANELS):
        part = df[df["metric"] == metric]
        ax.set_title(title)
        step_axis(ax, "epoch" if x == "epoch" else "optimizer step")
        part = part[np.isfinite(part["value"])]
        if part.empty:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
            continue
        if x == "epoch":
            # Validation rows sit at the end of their epoch: show epochs counted from 1.
            part = part.assign(epoch=part["epoch"] + 1)
        log = "loss" in metric and log_worthy(part["value"])
        if log:  # averaged as log values: a geometric mean and band
            ax.set_yscale("log")
            part = part.assign(value=np.log10(part["value"]))
        stats = mean_std(part, [x])
        y = stats["mean"].to_numpy()
        if x == "step":
            y = smooth(y)
        band(
            ax,
            stats[x].to_numpy(),
            y,
            stats["std"].to_numpy(),
            stats["count"].to_numpy(),
            label="mean ± std" if group.n > 1 else None,
            geometric=log,
            marker="o" if x == "epoch" else None,
        )
        if not log:
            compact_ticks(ax, "y")
        if "acc" in metric:
            ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if group.n > 1:
            ax.legend(loc="best", fontsize=8)
    fig.suptitle(group.title)
    return fig
