"""Gradient flow graph: tracked modules laid out by depth, one figure per epoch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import FancyArrowPatch

from netprobe.plots.common import RunGroup, epoch_suffix, figure, new_figure, short

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


@dataclass(frozen=True)
class FlowGraph:
    """What each epoch's figure of a group shares: the layout, the values and their scales."""

    nodes: list[str]  # forward order
    edges: list[tuple[str, str]]
    depth: dict[str, int]
    pos: dict[str, tuple[float, float]]
    node_norm: dict[tuple[str, int], float]  # (module, epoch) → RMS gradient per parameter
    edge_norm: dict[tuple[str, int], float]  # (source module, epoch) → ‖∂L/∂y‖₂
    threshold: float
    rule: str  # where the threshold comes from
    lo: float  # log10 range of the node values: colour and size
    hi: float
    edge_max: float

    @property
    def shape(self) -> tuple[int, int]:
        """Columns (depths) and the most nodes at one depth."""
        n_cols = max(self.depth.values(), default=0) + 1
        return n_cols, max(sum(1 for d in self.depth.values() if d == c) for c in range(n_cols))


def _epoch_means(df: pd.DataFrame, metric: str) -> dict[tuple[str, int], float]:
    """(layer, epoch) → `metric` averaged over each run's captures of the epoch, then over runs."""
    part = df[df["metric"] == metric]
    per_run = part.groupby(["layer", "epoch", "run"])["value"].mean()
    return {k: float(v) for k, v in per_run.groupby(["layer", "epoch"]).mean().items()}


def _threshold(group: RunGroup, df: pd.DataFrame) -> tuple[float, str]:
    """The weak-edge threshold and a phrase saying where it comes from."""
    chosen = group.probe_config(PROBE).get("threshold")
    if chosen is not None:
        return float(chosen), "threshold set in the run's config"
    threshold = relative_threshold(df.loc[df["metric"] == "out_grad_l2", "value"].tolist())
    return threshold, f"threshold {RELATIVE:g} × the run's median edge"


def flow_graph(group: RunGroup, df: pd.DataFrame) -> FlowGraph:
    """The group's graph from its `gradient_flow` scalars `df` and the first run's edges."""
    nodes = group.ordered(df["layer"])
    edge_rows = group.runs[0].matrices(PROBE, "edge")
    known = set(nodes)
    edges = [
        (s, t) for s, t in zip(edge_rows["row"], edge_rows["col"]) if s in known and t in known
    ]
    depth = longest_path_depth(nodes, edges)
    counts = parameter_counts(group)
    # Per parameter: ‖g‖₂/√n is the root-mean-square gradient of one of the module's weights.
    node_norm = {
        k: v / np.sqrt(counts[k[0]])
        for k, v in _epoch_means(df, "w_grad_l2").items()
        if counts.get(k[0])
    }
    edge_norm = _epoch_means(df, "out_grad_l2")
    logs = np.log10(np.clip(list(node_norm.values()), 1e-30, None))
    lo, hi = (float(logs.min()), float(logs.max())) if len(logs) else (0.0, 1.0)
    edge_max = max([v for v in edge_norm.values() if np.isfinite(v)], default=1.0) or 1.0
    return FlowGraph(
        nodes, edges, depth, _layout(nodes, depth), node_norm, edge_norm,
        *_threshold(group, df), lo, hi if hi > lo else lo + 1.0, edge_max,
    )  # fmt: skip


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
    graph = flow_graph(group, df)
    # Epochs counted from 1 in the names, as in the titles.
    return {
        epoch_suffix(epoch + 1): draw_epoch(graph, epoch, group)
        for epoch in pick_epochs(df["epoch"].unique().tolist())
    }


def draw_epoch(graph: FlowGraph, epoch: int, group: RunGroup) -> Figure:
    """One epoch's graph: edges, then nodes with their names (and values when few), the frame."""
    n_cols, n_rows = graph.shape
    size = (float(np.clip(0.55 * n_cols + 3.5, 7, 26)), float(np.clip(1.1 * n_rows + 3.2, 4.2, 12)))
    fig, axes = new_figure(size=size)
    ax = axes[0, 0]
    norms = np.array([graph.node_norm.get((n, epoch), np.nan) for n in graph.nodes])
    log_norm = np.log10(np.clip(norms, 1e-30, None))
    sizes = np.where(
        np.isfinite(log_norm), 40 + 560 * (log_norm - graph.lo) / (graph.hi - graph.lo), 20
    )
    area_of = dict(zip(graph.nodes, sizes))
    for s, t in graph.edges:
        ax.add_patch(_arrow(graph, s, t, graph.edge_norm.get((s, epoch)), area_of))
    _draw_nodes(ax, graph, norms, log_norm, sizes)
    _frame(fig, ax, graph)
    seeds = f", mean of {group.n} seeds" if group.n > 1 else ""
    ax.set_title(f"Gradient flow, epoch {epoch + 1}{seeds} — {group.title}", fontsize=10)
    return fig


def _arrow(
    graph: FlowGraph, s: str, t: str, value: float | None, area_of: dict[str, float]
) -> FancyArrowPatch:
    """The edge s → t: green above the threshold, red at or below it, grey dashed unrecorded;
    its width ∝ the gradient at its source."""
    (x0, y0), (x1, y1) = graph.pos[s], graph.pos[t]
    span = graph.depth[t] - graph.depth[s]
    # Skip connections arc over the nodes they pass instead of running through them.
    rad = 0.0 if span <= 1 and y0 == y1 else (-0.25 if y1 >= y0 else 0.25)
    if value is None or not np.isfinite(value):
        color, width, style = GREY, 0.6, "--"
    else:
        color = GREEN if value > graph.threshold else RED
        width, style = max(6.0 * value / graph.edge_max, 0.8), "-"
    return FancyArrowPatch(
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


def _draw_nodes(
    ax: Axes, graph: FlowGraph, norms: np.ndarray, log_norm: np.ndarray, sizes: np.ndarray
) -> None:
    """A dot per module (area and colour by its log value) named above; its value below when
    there are few enough nodes to print each one's."""
    cmap, norm = matplotlib.colormaps["viridis"], matplotlib.colors.Normalize(graph.lo, graph.hi)
    colors = [cmap(norm(v)) if np.isfinite(v) else (0.8, 0.8, 0.8, 1) for v in log_norm]
    xs = np.array([graph.pos[n][0] for n in graph.nodes])
    ys = np.array([graph.pos[n][1] for n in graph.nodes])
    ax.scatter(xs, ys, s=sizes, c=colors, edgecolors="black", linewidths=0.6, zorder=2)
    radii = np.sqrt(sizes) / 2
    for n, x, y, r in zip(graph.nodes, xs, ys, radii):
        ax.annotate(
            short(n, 22), (x, y), xytext=(0, r + 2), textcoords="offset points", rotation=25,
            ha="left", va="bottom", fontsize=6.5, zorder=3,
            bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none", "pad": 0.5},
        )  # fmt: skip
    if len(graph.nodes) > 16:
        return
    for x, y, r, v in zip(xs, ys, radii, norms):
        if np.isfinite(v):
            ax.annotate(f"{v:.2g}", (x, y), xytext=(0, -r - 2), textcoords="offset points",
                        ha="center", va="top", fontsize=6.5, color="0.25")  # fmt: skip


def _frame(fig: Figure, ax: Axes, graph: FlowGraph) -> None:
    """Limits, the depth axis, the node colour bar and the edge legend."""
    n_cols, n_rows = graph.shape
    ax.set_xlim(-0.6, n_cols - 0.4)
    ax.set_ylim(-(n_rows - 1) / 2 - 0.8, (n_rows - 1) / 2 + 1.3)
    ax.set_xticks(range(n_cols))
    ax.set_xlabel("depth in the data-flow graph (longest path from the input)")
    ax.set_yticks([])
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    fig.colorbar(
        matplotlib.cm.ScalarMappable(
            norm=matplotlib.colors.Normalize(graph.lo, graph.hi),
            cmap=matplotlib.colormaps["viridis"],
        ),
        ax=ax,
        label="log10 ‖∂L/∂W‖₂ / √#params (node colour, size)",
        shrink=0.8,
    )
    threshold = graph.threshold
    ax.legend(
        handles=[
            Line2D([], [], color=GREEN, lw=3, label=f"‖∂L/∂y‖₂ > {threshold:.2g}"),
            Line2D([], [], color=RED, lw=3, label=f"‖∂L/∂y‖₂ ≤ {threshold:.2g}"),
            Line2D(
                [], [], color="black", lw=6, label=f"width ∝ value; widest {graph.edge_max:.3g}"
            ),
        ],
        loc="lower left",
        fontsize=8,
        title=f"edge: gradient at its source\n{graph.rule}",
        title_fontsize=8,
        frameon=True,
    )
