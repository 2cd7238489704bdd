"""Figures of the weights probe, drawn from small runs trained through the real config path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch.nn as nn

import netprobe
from netprobe.plots import plot
from netprobe.plots.common import FIGURES, RunGroup
from netprobe.plots.weights import trained_epochs

NAMES = ["weights_histograms", "weights_evolution", "weights_stats"]


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory: pytest.TempPathFactory, train_seeds) -> Path:
    root = tmp_path_factory.mktemp("weights")
    return train_seeds(root, "model=cnn", "probes=[weights]", "probes.weights.params=all")


def test_figures_render(two_seeds: Path, tmp_path: Path) -> None:
    written = plot([two_seeds], out=tmp_path, only=NAMES)
    assert sorted(p.stem for p in written) == sorted(NAMES)
    for path in written:
        assert path.stat().st_size > 5_000, path


def test_histogram_grid_in_forward_order_with_first_and_last_moments(two_seeds: Path) -> None:
    group = RunGroup(netprobe.load_runs(two_seeds))
    run = group.runs[0]
    fig = FIGURES["weights_histograms"].draw(group)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    layers = run.layers()
    params = [f"{m}.{p}" for m, p in zip(layers["module"], layers["param"]) if p]
    assert [t.split("\n")[0] for t in titles] == params  # every tensor, forward order
    stats = run.scalars("weights")
    first, last = stats["step"].min(), stats["step"].max()
    name = params[0]
    value = lambda metric, step: stats[  # noqa: E731
        (stats["layer"] == name) & (stats["metric"] == metric) & (stats["step"] == step)
    ]["value"].iloc[0]
    assert f"σ {value('std', first):.2g} → {value('std', last):.2g}" in titles[0]
    assert f"skew {value('skew', first):.2g} → {value('skew', last):.2g}" in titles[0]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[0] == "before training" and legend[1].startswith("after epoch 2")


def test_evolution_has_a_panel_per_tensor_and_a_colour_bar(two_seeds: Path) -> None:
    group = RunGroup(netprobe.load_runs(two_seeds))
    fig = FIGURES["weights_evolution"].draw(group)
    n = len(group.runs[0].histograms("weights")["layer"].unique())
    meshes = [ax for ax in fig.axes if ax.collections and ax.get_title()]
    assert len(meshes) == n
    assert any("fraction of values" in ax.get_ylabel() for ax in fig.axes)


def test_stats_average_over_seeds(two_seeds: Path) -> None:
    group = RunGroup(netprobe.load_runs(two_seeds))
    fig = FIGURES["weights_stats"].draw(group)
    labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert labels and all(label.endswith("(n=2)") for label in labels)
    # The dist_init line of the first tensor is the mean over the two seeds per capture.
    df = group.scalars("weights", "dist_init")
    name = group.ordered(df["layer"])[0]
    rows = df[df["layer"] == name].assign(x=lambda d: trained_epochs(d))
    want = rows.groupby("x")["value"].mean().to_numpy()
    line = fig.axes[2].get_lines()[0]
    np.testing.assert_allclose(line.get_ydata(), want)
    np.testing.assert_array_equal(line.get_xdata(), [0, 1, 2])


def test_no_figures_without_the_probe(tmp_path: Path) -> None:
    with netprobe.attach(nn.Linear(2, 2), tmp_path / "run", probes=[]):
        pass
    group = RunGroup([netprobe.load(tmp_path / "run")])
    assert all(FIGURES[name].draw(group) is None for name in NAMES)
