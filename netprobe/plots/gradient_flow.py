"""Gradient flow graph: tracked modules laid out by depth, one figure per epoch."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import FancyArrowPatch

from netprobe.plots.common import RunGroup, figure, new_figure, short

PROBE = "gradient_flow"
MAX_EPOCHS = 12
GREEN, RED, GREY = "#2ca02c", "#d62728", "0.6"


def longest_path_depth(nodes: Sequence[str], edges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """Depth of each node: the number of edges on the longest path reaching it (sources are 0).

    Nodes on a cycle, which a traced data flow never has, keep the depth reached so far.
    """
    known = set(nodes)
    succ: dict[str, list[str]] = {n: [] for n in nodes}
    indegree = dict.fromkeys(nodes, 0)
    for s, t in edges:
        if s in known and t in known and s != t:
            succ[s].append(t)
            indegree[t] += 1
    depth = dict.fromkeys(nodes, 0)
    ready = [n for n in nodes if indegree[n] == 0]
    while ready:
        n = ready.pop(0)
        for t in succ[n]:
            depth[t] = max(depth[t], depth[n] + 1)
            indegree[t] -= 1
            if indegree[t] == 0:
                ready.append(t)
    return depth


def pick_epochs(epochs: Sequence[int], limit: int = MAX_EPOCHS) -> list[int]:
    """At most `limit` epochs, evenly spaced, always the first and the last."""
    epochs = sorted(epochs)
    if len(epochs) <= limit:
        return epochs
    picks = np.unique(np.round(np.linspace(0, len(epochs) - 1, limit)).astype(int))
    return [epochs[i] for i in picks]


RELATIVE = 0.1  # an edge is weak below this fraction of the run's median edge gradient


def relative_threshold(values: Sequence[float]) -> float:
    """RELATIVE × the median of the finite, positive edge gradients stored for the run(s): weak
    is judged against the network's own scale, not a fixed number that suits one model."""
    v = np.asarray([x for x in values if np.isfinite(x) and x > 0], dtype=float)
    return float(RELATIVE * np.median(v)) if v.size else 0.0


def parameter_counts(group: RunGroup) -> dict[str, int]:
    """Parameters per module (all of its parameters), from layers.parquet."""
    layers = group.runs[0].layers()
    params = layers[layers["param"] != ""]
    return {m: int(n) for m, n in params.groupby("module")["numel"].sum().items()}


def _layout(nodes: list[str], depth: dict[str, int]) -> dict[str, tuple[float, float]]:
    """x = depth; nodes sharing a depth are stacked in forward order, centred on y = 0."""
    columns: dict[int, list[str]] = {}
    for n in nodes:
        columns.setdefault(depth[n], []).append(n)
    pos = {}
    for d, members in columns.items():
        for i, n in enumerate(members):
            pos[n] = (float(d), (len(members) - 1) / 2 - i)
    return pos


@figure(
    "gradient_flow_graph",
    "Gradient flow between tracked modules (left → right by depth), mean over the epoch's "
    "captures: node size and colour ∝ log10 of the RMS gradient per parameter ‖∂L/∂W‖₂/√#params "
    "(normalised by parameter count, so small BatchNorm layers compare with large convs), edge "
    "width ∝ ‖∂L/∂y‖₂ at the edge's source, red at or below the threshold: 0.1 × the run's median "
    "edge value unless the run's config sets one.",
)
def gradient_flow_graph(group: RunGroup):
    df = group.scalars(PROBE)
    if df.empty:
        return None
    # Per run first (mean over the epoch's captures), then mean over runs.
    per_run = df.groupby(["metric", "layer", "epoch", "run"])["value"].mean()
    table = per_run.groupby(["metric", "layer", "epoch"]).mean()
    nodes = group.ordered(df["layer"])
    edge_rows = group.runs[0].matrices(PROBE, "edge")
    known = set(nodes)
    edges = [
        (s, t) for s, t in zip(edge_rows["row"], edge_rows["col"]) if s in known and t in known
    ]
    depth = longest_path_depth(nodes, edges)
    pos = _layout(nodes, depth)

    def values(metric: str) -> dict[tuple[str, int], float]:
        part = table[metric] if metric in table.index.get_level_values(0) else None
        return {} if part is None else {k: float(v) for k, v in part.items()}

    w_norm, out_norm = values("w_grad_l2"), values("out_grad_l2")
    counts = parameter_counts(group)
    # Per parameter: ‖g‖₂/√n is the root-mean-square gradient of one of the module's weights.
    w_norm = {k: v / np.sqrt(counts[k[0]]) for k, v in w_norm.items() if counts.get(k[0])}
    chosen = (((group.runs[0].config or {}).get("probes") or {}).get(PROBE) or {}).get("threshold")
    if chosen is None:
        threshold = relative_threshold(df.loc[df["metric"] == "out_grad_l2", "value"].tolist())
        rule = f"threshold {RELATIVE:g} × the run's median edge"
    else:
        threshold, rule = float(chosen), "threshold set in the run's config"
    node_norm = w_norm
    logs = np.log10(np.clip([v for v in node_norm.values()], 1e-30, None))
    lo, hi = (float(logs.min()), float(logs.max())) if len(logs) else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    edge_max = max([v for v in out_norm.values() if np.isfinite(v)], default=1.0) or 1.0
    cmap = matplotlib.colormaps["viridis"]
    norm = matplotlib.colors.Normalize(lo, hi)

    n_cols = max(depth.values(), default=0) + 1
    n_rows = max(sum(1 for d in depth.values() if d == c) for c in range(n_cols))
    size = (float(np.clip(0.55 * n_cols + 3.5, 7, 26)), float(np.clip(1.1 * n_rows + 3.2, 4.2, 12)))
    epochs = pick_epochs(df["epoch"].unique().tolist())
    figures = {}
    for epoch in epochs:
        fig, axes = new_figure(size=size)
        ax = axes[0, 0]
        xs = np.array([pos[n][0] for n in nodes])
        ys = np.array([pos[n][1] for n in nodes])
        norms = np.array([node_norm.get((n, epoch), np.nan) for n in nodes])
        log_norm = np.log10(np.clip(norms, 1e-30, None))
        sizes = np.where(np.isfinite(log_norm), 40 + 560 * (log_norm - lo) / (hi - lo), 20)
        colors = [cmap(norm(v)) if np.isfinite(v) else (0.8, 0.8, 0.8, 1) for v in log_norm]
        area_of = dict(zip(nodes, sizes))
        for s, t in edges:
            value = out_norm.get((s, epoch))
            (x0, y0), (x1, y1) = pos[s], pos[t]
            span = depth[t] - depth[s]
            # Skip connections arc over the nodes they pass instead of running through them.
            rad = 0.0 if span <= 1 and y0 == y1 else (-0.25 if y1 >= y0 else 0.25)
            if value is None or not np.isfinite(value):
                color, width, style = GREY, 0.6, "--"
            else:
                color = GREEN if value > threshold else RED
                width, style = max(6.0 * value / edge_max, 0.8), "-"
            ax.add_patch(
                FancyArrowPatch(
                    (x0, y0),
                    (x1, y1),
                    arrowstyle="-|>",
                    mutation_scale=7 + width,
                    lw=width,
                    ls=style,
                    color=color,
                    alpha=0.85,
                    connectionstyle=f"arc3,rad={rad}",
                    # Marker sizes are areas in points²: stop the arrows at the node borders.
                    shrinkA=np.sqrt(area_of[s]) / 2 + 1,
                    shrinkB=np.sqrt(area_of[t]) / 2 + 2,
                    zorder=1,
                )
            )
        ax.scatter(xs, ys, s=sizes, c=colors, edgecolors="black", linewidths=0.6, zorder=2)
        for n, x, y in zip(nodes, xs, ys):
            ax.annotate(
                short(n, 22),
                (x, y),
                xytext=(0, np.sqrt(area_of[n]) / 2 + 2),
                textcoords="offset points",
                rotation=25,
                ha="left",
                va="bottom",
                fontsize=6.5,
                zorder=3,
                bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none", "pad": 0.5},
            )
        if len(nodes) <= 16:
            # Few enough nodes to print each one's value beside it.
            for n, x, y, v in zip(nodes, xs, ys, norms):
                if np.isfinite(v):
                    ax.annotate(
                        f"{v:.2g}",
                        (x, y),
                        xytext=(0, -np.sqrt(area_of[n]) / 2 - 2),
                        textcoords="offset points",
                        ha="center",
                        va="top",
                        fontsize=6.5,
                        color="0.25",
                    )
        ax.set_xlim(-0.6, n_cols - 0.4)
        ax.set_ylim(-(n_rows - 1) / 2 - 0.8, (n_rows - 1) / 2 + 1.3)
        ax.set_xticks(range(n_cols))
        ax.set_xlabel("depth in the data-flow graph (longest path from the input)")
        ax.set_yticks([])
        for side in ("top", "right", "left"):
            ax.spines[side].set_visible(False)
        fig.colorbar(
            matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap),
            ax=ax,
            label="log10 ‖∂L/∂W‖₂ / √#params (node colour, size)",
            shrink=0.8,
        )
        ax.legend(
            handles=[
                Line2D([], [], color=GREEN, lw=3, label=f"‖∂L/∂y‖₂ > {threshold:.2g}"),
                Line2D([], [], color=RED, lw=3, label=f"‖∂L/∂y‖₂ ≤ {threshold:.2g}"),
                Line2D([], [], color="black", lw=6, label=f"width ∝ value; widest {edge_max:.3g}"),
            ],
            loc="lower left",
            fontsize=8,
            title=f"edge: gradient at its source\n{rule}",
            title_fontsize=8,
            frameon=True,
        )
        seeds = f", mean of {group.n} seeds" if group.n > 1 else ""
        ax.set_title(f"Gradient flow, epoch {epoch + 1}{seeds} — {group.title}", fontsize=10)
        figures[f"epoch{epoch + 1:03d}"] = fig  # epochs counted from 1, as in the title
    return figures
