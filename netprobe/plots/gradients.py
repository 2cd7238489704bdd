"""Gradient statistics: flow bars, L1/L2 norms over steps, and a layer × step heatmap."""

from __future__ import annotations

import numpy as np
from matplotlib.colors import ListedColormap

from netprobe.plots.common import (
    RunGroup,
    band,
    figure,
    layer_colors,
    left_out,
    new_figure,
    over_runs,
    reveal_coinciding,
    short,
    smooth,
    step_axis,
)


def _stats(group: RunGroup, metric: str):
    df = group.scalars("gradients", metric)
    return df[df["layer"] != ""]


@figure(
    "grad_flow_bars",
    "Gradient flow per layer (forward order): max over steps of max|g| (▲) and mean over steps "
    "of mean|g| (●), joined by a line (log axis: points, not bars; error bars ± std over runs); "
    "a layer whose gradient is 0 throughout is marked |g| = 0.",
)
def grad_flow_bars(group: RunGroup):
    max_abs, mean_abs = _stats(group, "max_abs"), _stats(group, "mean_abs")
    if max_abs.empty:
        return None
    layers = group.ordered(max_abs["layer"])
    # Per run first (max or mean over its steps), then mean and std over runs.
    peak = max_abs.groupby(["layer", "run"])["value"].max().groupby("layer").agg(["mean", "std"])
    avg = mean_abs.groupby(["layer", "run"])["value"].mean().groupby("layer").agg(["mean", "std"])
    peak, avg = peak.reindex(layers).fillna(0), avg.reindex(layers).fillna(0)
    x = np.arange(len(layers))
    fig, axes = new_figure(size=(max(6.4, 0.45 * len(layers) + 2), 4.6))
    ax = axes[0, 0]
    err = group.n > 1
    if (peak["mean"] > 0).any():  # else every gradient is 0: a linear axis shows them at 0
        ax.set_yscale("log")
    ax.vlines(x, avg["mean"], peak["mean"], color="0.6", lw=2, zorder=1)
    for stats, marker, color, label in (
        (peak, "^", "tab:cyan", "max |g|"),
        (avg, "o", "tab:blue", "mean |g|"),
    ):
        ax.errorbar(x, stats["mean"], yerr=stats["std"] if err else None, fmt=marker,
                    color=color, ms=7, capsize=3, label=label, zorder=2)  # fmt: skip
    for i in np.flatnonzero(peak["mean"].to_numpy() <= 0):  # a log axis has no 0 to put them at
        ax.text(x[i], 0.03, "|g| = 0", transform=ax.get_xaxis_transform(), ha="center",
                va="bottom", rotation=90, fontsize=8, color="0.35")  # fmt: skip
    ax.set_xticks(x, [short(n) for n in layers], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("gradient magnitude")
    ax.set_xlabel("layer (forward order)")
    ax.legend(title=f"n={group.n}" if group.n > 1 else None)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("Gradient flow")
    fig.suptitle(group.title, wrap=True)  # a narrow figure: the title on lines of its width
    return fig


@figure(
    "grad_norms",
    "L1 and L2 norm of each layer's gradient over training steps (log scale; several runs: "
    "geometric mean ×/÷ std); a red dotted line at the first step a norm went NaN or inf; "
    "norms of exactly 0 (a dead layer or network), which the log axis cannot show, are left out "
    "of the mean and counted below the panels.",
)
def grad_norms(group: RunGroup):
    l1, l2 = _stats(group, "l1"), _stats(group, "l2")
    if l1.empty:
        return None
    layers = group.ordered(l1["layer"])
    fig, axes = new_figure(1, 2, size=(6.0, 4.4))
    colors = layer_colors(layers)
    for ax, df, title in ((axes[0, 0], l1, "L1 norm"), (axes[0, 1], l2, "L2 norm")):
        for layer, color in colors.items():
            logs = over_runs(df[df["layer"] == layer], "step", geometric=True)
            band(
                ax,
                logs.index.to_numpy(),
                smooth(logs["mean"].to_numpy()),
                smooth(logs["std"].to_numpy()),
                logs["count"].to_numpy(),
                label=short(layer),
                color=color,
                geometric=True,
            )
        broken = df.loc[~np.isfinite(df["value"].to_numpy(float)), "step"]
        if not broken.empty:  # where the curves end because a norm went NaN or inf
            first = int(broken.min())
            ax.axvline(first, color="red", ls=":", lw=1.5, label=f"non-finite from step {first}")
        ax.set_yscale("log")
        if not (df["value"] > 0).any():  # a dead network: no curve to draw, the note says why
            ax.text(0.5, 0.5, "every norm is 0", ha="center", va="center", transform=ax.transAxes)
        reveal_coinciding(ax)
        step_axis(ax)
        ax.set_title(f"gradient {title}")
        ax.grid(alpha=0.3)
    axes[0, 1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    note = left_out(l2, group.n, "zero gradient norms")  # a norm is 0 in L1 and L2 alike
    if note:
        fig.supxlabel(note, fontsize=9)
    fig.suptitle(group.title)
    return fig


@figure(
    "grad_heatmap",
    "log10 of each layer's gradient L2 norm, layer × step (mean over runs); black: 0 (a dead "
    "layer), red: NaN or inf.",
)
def grad_heatmap(group: RunGroup):
    l2 = _stats(group, "l2")
    if l2.empty:
        return None
    layers = group.ordered(l2["layer"])
    steps = np.unique(l2["step"].to_numpy())
    # The mean over the runs whose norm is finite; a norm gone NaN or inf (a diverging run) is
    # painted red over it, not left a blank cell or a colour scale stretched to infinity.
    finite = np.isfinite(l2["value"].to_numpy(float))
    table = l2[finite].pivot_table(index="layer", columns="step", values="value", aggfunc="mean")
    table = table.reindex(index=layers, columns=steps)
    # A mean norm of 0 (every run's gradient exactly 0: a dead layer) has no log: painted black,
    # not clipped to a made-up 1e-30 that the colour scale would show as a value.
    means = table.to_numpy(dtype=float)
    zero = means <= 0
    values = np.log10(np.where(zero, np.nan, means))
    broken = l2[~finite].pivot_table(index="layer", columns="step", values="value", aggfunc="size")
    broken = broken.reindex(index=layers, columns=steps).notna().to_numpy()
    fig, axes = new_figure(size=(9.0, max(3.0, 0.3 * len(layers) + 1.6)))
    ax = axes[0, 0]
    extent = (steps[0] - 0.5, steps[-1] + 0.5, len(layers) - 0.5, -0.5)
    cells = {"aspect": "auto", "interpolation": "nearest", "extent": extent}
    mesh = ax.imshow(values, cmap="viridis", **cells)
    for where, color in ((zero, "black"), (broken, "red")):
        if where.any():
            ax.imshow(np.where(where, 1.0, np.nan), cmap=ListedColormap([color]), **cells)
    ax.set_yticks(range(len(layers)), [short(n, 36) for n in layers], fontsize=8)
    step_axis(ax)
    marks = [
        m for m, shown in (("black: 0", zero.any()), ("red: NaN or inf", broken.any())) if shown
    ]
    ax.set_title("log10 ‖g‖₂ per layer" + (f"  ({', '.join(marks)})" if marks else ""))
    fig.suptitle(group.title)
    fig.colorbar(mesh, ax=ax, label="log10 L2 norm")
    return fig
