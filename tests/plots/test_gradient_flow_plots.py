"""The gradient flow graph: layout helpers, one figure per epoch, the threshold from the config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from matplotlib.patches import FancyArrowPatch

import netprobe
from netprobe.plots import plot
from netprobe.plots.common import FIGURES, RunGroup
from netprobe.plots.gradient_flow import longest_path_depth, pick_epochs
from tests.helpers import train_steps

GREEN, RED = (
    (0.17254901960784313, 0.6274509803921569, 0.17254901960784313),
    (
        0.8392156862745098,
        0.15294117647058825,
        0.1568627450980392,
    ),
)


class Residual(nn.Module):
    """Two linear layers with a skip connection around the second, and an in-place ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(6, 8)
        self.act = nn.ReLU(inplace=True)
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.stem(x))
        return self.head(self.act(self.body(h)) + h)


def train_residual(path: Path, epochs: int, steps: int = 3, **probe_cfg) -> netprobe.Run:
    """A run written through the library API (SPEC §4), a few steps per epoch."""
    torch.manual_seed(0)
    model = Residual()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    probes = {"gradient_flow": {"every": 1, **probe_cfg}}
    with netprobe.attach(model, path, probes=probes, probe_batch=(x, y)) as mon:
        for _ in range(epochs):
            train_steps(mon, model, opt, [(x, y)] * steps)
            mon.end_epoch()
    return netprobe.load(path)


def edge_colors(fig) -> list[tuple[float, ...]]:
    ax = fig.axes[0]
    return [tuple(p.get_edgecolor()[:3]) for p in ax.patches if isinstance(p, FancyArrowPatch)]


def test_longest_path_depth_puts_skips_at_their_deepest_input() -> None:
    nodes = ["a", "b", "c", "d"]
    edges = [("a", "b"), ("b", "c"), ("a", "c"), ("c", "d"), ("a", "d")]
    assert longest_path_depth(nodes, edges) == {"a": 0, "b": 1, "c": 2, "d": 3}
    # Unconnected nodes start a column of their own at depth 0; unknown endpoints are ignored.
    assert longest_path_depth(["x", "y"], [("x", "z")]) == {"x": 0, "y": 0}


def test_pick_epochs_caps_and_keeps_first_and_last() -> None:
    assert pick_epochs([2, 0, 1]) == [0, 1, 2]
    picked = pick_epochs(list(range(40)))
    assert len(picked) == 12 and picked[0] == 0 and picked[-1] == 39
    assert picked == sorted(set(picked))
    gaps = set(b - a for a, b in zip(picked, picked[1:]))
    assert max(gaps) - min(gaps) <= 1


def test_one_figure_per_epoch_with_skip_connections(tmp_path: Path) -> None:
    run = train_residual(tmp_path / "run", epochs=3)
    edges = run.matrices("gradient_flow", "edge")
    assert set(zip(edges["row"], edges["col"])) == {
        ("stem", "body"),
        ("stem", "head"),
        ("body", "head"),
    }
    written = plot([run.path], out=tmp_path / "figures", only=["gradient_flow_graph"])
    assert [p.stem for p in written] == [f"gradient_flow_graph_epoch{e:04d}" for e in (1, 2, 3)]
    for path in written:
        assert path.stat().st_size > 5_000, path


def test_edge_colours_follow_the_threshold(tmp_path: Path) -> None:
    group = RunGroup([train_residual(tmp_path / "low", epochs=1)])
    colours = edge_colors(FIGURES["gradient_flow_graph"].draw(group)["epoch0001"])
    scalars = group.scalars("gradient_flow", "out_grad_l2")
    assert len(colours) == 3
    # By default the threshold is 0.1 × the median of every stored edge value of the run; each
    # edge is green exactly when its source's (epoch-mean) norm is above it.
    threshold = 0.1 * np.median(scalars["value"])
    above = scalars.groupby("layer")["value"].mean() > threshold
    expected = sorted([GREEN if above[s] else RED for s in ("stem", "stem", "body")])
    assert sorted(colours) == expected


def test_threshold_is_read_from_the_run_config(tiny_run) -> None:
    run = tiny_run(
        "model=mlp",
        "probes=[gradient_flow]",
        "probes.gradient_flow.every=3",
        "probes.gradient_flow.threshold=1.0e9",
    )
    figures = FIGURES["gradient_flow_graph"].draw(RunGroup([run]))
    assert sorted(figures) == ["epoch0001", "epoch0002"]  # epochs counted from 1
    colours = edge_colors(figures["epoch0002"])
    assert colours and set(colours) == {RED}
