"""Training curves: loss and accuracy per step, validation per epoch."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from netprobe.plots.common import (
    RunGroup,
    band,
    compact_ticks,
    figure,
    log_worthy,
    new_figure,
    over_runs,
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
    "from 1), several runs: their mean ± std over each run in grey; loss on a log axis when it "
    "spans more than two decades.",
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
        if log:
            ax.set_yscale("log")
        label = "mean ± std" if group.n > 1 else None
        metric_curve(ax, every, x, log, label, n=group.n, marker="o" if x == "epoch" else None)
        if group.n > 1:  # each run faintly under the mean: seeds that split (some learn, some
            _each_run(ax, part, x)  # do not) look like one spread-out curve in a band alone
        if not log:
            compact_ticks(ax, "y")
        if "acc" in metric:
            ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8)
    fig.suptitle(group.title)
    return fig


def _each_run(ax, rows: pd.DataFrame, x: str) -> None:
    """A thin grey line per run of `rows` (finite values), smoothed along steps as the mean; a
    small dot for a run of one point (one epoch), which a line would not draw."""
    for k, (_, one) in enumerate(rows.sort_values(x).groupby("run")):
        y = one["value"].to_numpy()
        ax.plot(one[x].to_numpy(), smooth(y) if x == "step" else y, color="0.5", lw=0.6,
                alpha=0.6, zorder=1, label="each run" if k == 0 else None,
                marker="o" if len(y) == 1 else None, ms=3)  # fmt: skip


def metric_curve(
    ax,
    rows: pd.DataFrame,
    x: str,
    log: bool,
    label: str | None,
    color: Any = None,
    n: int = 1,
    named_marks: bool = True,
    **style: Any,
) -> None:
    """A group's curve of one training metric (`rows`: its runs' rows, with a `run` column), as
    `training_curves` and `compare_curves` both draw it: the mean over the runs at every x any of
    them reached (`over_runs`; the legend counts the runs: `n=3, 2 from step 46` where one
    stopped earlier), smoothed along steps, ± std (geometric on a log axis), and an × at each
    run's last finite value before a NaN or inf, red and named in the legend (`named_marks`) or
    in `color`."""
    stats = over_runs(rows, x, geometric=log)
    if stats.empty:
        return
    y = stats["mean"].to_numpy()
    if x == "step":
        y = smooth(y)
    counts = stats["count"].to_numpy()
    band(ax, stats.index.to_numpy(), y, stats["std"].to_numpy(), counts, label=label,
         color=color, geometric=log, unit=x, **style)  # fmt: skip
    _mark_nonfinite(ax, rows, x, n, "red" if named_marks else color, named_marks)


def _mark_nonfinite(ax, rows, x: str, n: int, color: Any, named: bool) -> None:
    """An × on each run's last finite value before its first NaN or inf (a divergence), which
    the curve alone would hide by ending there; `named`: the legend names the step."""
    bad = rows[~np.isfinite(rows["value"])]
    firsts = bad.groupby("run")[x].min()
    for k, (run, first) in enumerate(firsts.items()):
        before = rows[(rows["run"] == run) & (rows[x] < first) & np.isfinite(rows["value"])]
        if before.empty:
            continue
        last = before.loc[before[x].idxmax()]
        runs = f" in {len(firsts)} of {n} runs" if n > 1 else ""
        label = f"non-finite from {x} {int(first)}{runs}" if named and k == 0 else None
        ax.plot(last[x], last["value"], "x", color=color, ms=9, mew=2, label=label)
