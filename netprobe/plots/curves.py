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
        every = df[df["metric"] == metric]
        ax.set_title(title)
        step_axis(ax, "epoch" if x == "epoch" else "optimizer step")
        if x == "epoch":
            # Validation rows sit at the end of their epoch: show epochs counted from 1.
            every = every.assign(epoch=every["epoch"] + 1)
        part = every[np.isfinite(every["value"])]
        if part.empty:
            # Validation rows come at epoch ends: a run stopped within its first epoch has none.
            ended = x == "step" or df.loc[df["metric"] == "loss", "epoch"].max() > 0
            what = "not recorded" if ended else "no epoch finished"
            if not every.empty:  # recorded, but not one value a number
                what = "every value NaN or inf"
            ax.text(0.5, 0.5, what, ha="center", va="center", transform=ax.transAxes)
            continue
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
        _mark_nonfinite(ax, every, x, group.n)
        if not log:
            compact_ticks(ax, "y")
        if "acc" in metric:
            ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8)
    fig.suptitle(group.title)
    return fig


def _mark_nonfinite(ax, rows, x: str, n: int) -> None:
    """An × on each run's last finite value before its first NaN or inf (a divergence), which
    the curve alone would hide by ending there; the legend names the step."""
    bad = rows[~np.isfinite(rows["value"])]
    firsts = bad.groupby("run")[x].min()
    for k, (run, first) in enumerate(firsts.items()):
        before = rows[(rows["run"] == run) & (rows[x] < first) & np.isfinite(rows["value"])]
        if before.empty:
            continue
        last = before.loc[before[x].idxmax()]
        runs = f" in {len(firsts)} of {n} runs" if n > 1 else ""
        label = f"non-finite from {x} {int(first)}{runs}" if k == 0 else None
        ax.plot(last[x], last["value"], "x", color="red", ms=9, mew=2, label=label)
