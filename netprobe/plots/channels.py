"""Channel gradient statistics: per-channel absorption (above) and emission (below) per conv."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.patches import Patch

from netprobe.plots.common import RunGroup, figure, new_figure, short
from netprobe.plots.correlation import when, with_epochs

PROBE = "channels"
COLORS = {"first": "#9ecae1", "last": "#3182bd"}


def _values(df: pd.DataFrame, name: str, layer: str, x: int) -> np.ndarray:
    """Every channel's value of `layer` at capture `x`, pooled over the group's runs."""
    rows = df[(df["name"] == name) & (df["row"] == layer) & (df["x"] == x)]
    return np.concatenate(rows["values"].to_list()) if len(rows) else np.zeros(0)


@figure(
    "channel_boxplots",
    "Per-channel gradient absorption Ab_c2 = Σ_c1 ‖LG^{c1→c2}‖ (above) and emission "
    "Em_c1 = Σ_c2 ‖LG^{c1→c2}‖ (below) for each conv layer in forward order; one box per "
    "layer over its channels (pooled over the group's runs), first and last capture when there "
    "are two.",
)
def channel_boxplots(group: RunGroup):
    df = group.matrices(PROBE)
    if df.empty:
        return None
    df = with_epochs(df)
    layers = group.ordered(df["row"])
    first, last = int(df["x"].min()), int(df["x"].max())
    captures = [("last", last)] if first == last else [("first", first), ("last", last)]
    width = 0.8 / len(captures)
    fig, axes = new_figure(2, 1, size=(max(6.4, 0.9 * len(layers) * len(captures) + 2.5), 3.4))
    positions = np.arange(len(layers))
    for ax, name, title in (
        (axes[0, 0], "absorption", "absorption: gradient each input channel receives"),
        (axes[1, 0], "emission", "emission: gradient each output channel sends back"),
    ):
        zeros_noted = False
        for k, (which, x) in enumerate(captures):
            data = [_values(df, name, layer, x) for layer in layers]
            # Log scale across layers whose magnitudes differ by decades; channels with exactly
            # zero gradient (dead) cannot be drawn there, so each box says how many it leaves out.
            positive = [d[d > 0] for d in data]
            offset = (k - (len(captures) - 1) / 2) * width
            ax.boxplot(
                [d if len(d) else [np.nan] for d in positive],
                positions=positions + offset,
                widths=width * 0.85,
                patch_artist=True,
                boxprops={"facecolor": COLORS[which], "edgecolor": "0.2"},
                medianprops={"color": "black"},
                flierprops={"markersize": 3, "markerfacecolor": COLORS[which], "alpha": 0.7},
                manage_ticks=False,
            )
            for pos, d, p in zip(positions + offset, data, positive):
                if len(d) > len(p):
                    zeros_noted = True
                    ax.annotate(
                        f"{len(d) - len(p)}×0", (pos, 0), xycoords=("data", "axes fraction"),
                        xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                        fontsize=7, color="tab:red",
                        bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5},
                    )  # fmt: skip
        ax.set_yscale("log")
        if zeros_noted:
            title += "\n(red n×0: channels at exactly 0, left off the log axis)"
        ax.set_xticks(positions, [short(n) for n in layers], rotation=30, ha="right", fontsize=8)
        ax.set_xlim(-0.6, len(layers) - 0.4)
        ax.set_ylabel(f"{name}\n(sum of ‖LG‖_F)")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[1, 0].set_xlabel("conv layer (forward order); one box = its channels")
    handles = [
        Patch(facecolor=COLORS[which], edgecolor="0.2", label=when(x)) for which, x in captures
    ]
    seeds = f", channels pooled over {group.n} runs" if group.n > 1 else ""
    axes[0, 0].legend(handles=handles, fontsize=8, loc="best", title=f"capture{seeds}",
                      title_fontsize=8)  # fmt: skip
    fig.suptitle(f"Channel gradient absorption and emission — {group.title}", fontsize=11)
    return fig
