"""Training curves: loss and accuracy per step, validation per epoch."""

from __future__ import annotations

from matplotlib.ticker import MaxNLocator

from netprobe.plots.common import RunGroup, band, figure, mean_std, new_figure, smooth

PANELS = [
    ("loss", "train loss", "step"),
    ("acc", "train accuracy", "step"),
    ("val_loss", "validation loss", "epoch"),
    ("val_acc", "validation accuracy", "epoch"),
]


@figure(
    "training_curves", "Training loss and accuracy per step (smoothed) and validation per epoch."
)
def training_curves(group: RunGroup):
    df = group.scalars("train")
    if df.empty:
        return None
    fig, axes = new_figure(2, 2, size=(5.2, 3.4))
    for ax, (metric, title, x) in zip(axes.flat, PANELS):
        part = df[df["metric"] == metric]
        ax.set_title(title)
        ax.set_xlabel("epoch" if x == "epoch" else "optimizer step")
        if part.empty:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
            continue
        if x == "epoch":
            # Validation rows sit at the end of their epoch: show epochs counted from 1.
            part = part.assign(epoch=part["epoch"] + 1)
        stats = mean_std(part, [x])
        y = stats["mean"].to_numpy()
        if x == "step":
            y = smooth(y)
        band(
            ax,
            stats[x].to_numpy(),
            y,
            stats["std"].to_numpy(),
            group.n,
            label="mean ± std" if group.n > 1 else None,
            marker="o" if x == "epoch" else None,
        )
        if x == "epoch":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if "acc" in metric:
            ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if group.n > 1:
            ax.legend(loc="best", fontsize=8)
    fig.suptitle(group.title)
    return fig
