"""Figures of the rwc probe, drawn from small stored runs trained through the real config path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch.nn as nn

import netprobe
from netprobe.plots import plot
from netprobe.plots.common import FIGURES, RunGroup

NAMES = ["rwc_curves", "rwc_heatmap"]


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory: pytest.TempPathFactory, train_seeds) -> Path:
    root = tmp_path_factory.mktemp("rwc")
    return train_seeds(root, "model=cnn", "probes=[rwc]", "trainer.epochs=3")


def test_figures_render(two_seeds: Path, tmp_path: Path) -> None:
    written = plot([two_seeds], out=tmp_path, only=NAMES)
    assert sorted(p.stem for p in written) == sorted(NAMES)
    for path in written:
        assert path.stat().st_size > 5_000, path


def test_curves_one_line_per_layer_in_forward_order_averaged_over_seeds(two_seeds: Path) -> None:
    group = RunGroup(netprobe.load_runs(two_seeds))
    fig = FIGURES["rwc_curves"].draw(group)
    df = group.scalars("rwc", "rwc")
    layers = group.ordered(df["layer"])
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == [f"{name} (n=2)" for name in layers]
    assert "2 seeds" in fig.legends[0].get_title().get_text()
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    for line, layer in zip(ax.get_lines(), layers):
        # A log axis: the geometric mean over seeds.
        logs = np.log10(df.loc[df["layer"] == layer, "value"])
        want = 10 ** logs.groupby(df["epoch"]).mean()
        np.testing.assert_array_equal(line.get_xdata(), [1, 2, 3])
        np.testing.assert_allclose(line.get_ydata(), want.to_numpy())
    # Bands: one filled area per layer for the spread over seeds.
    assert len(ax.collections) == len(layers)


def test_heatmap_rows_are_layers_in_forward_order_with_the_mean_over_seeds(two_seeds) -> None:
    group = RunGroup(netprobe.load_runs(two_seeds))
    fig = FIGURES["rwc_heatmap"].draw(group)
    ax = fig.axes[0]
    df = group.scalars("rwc", "rwc")
    layers = group.ordered(df["layer"])
    assert [t.get_text() for t in ax.get_yticklabels()] == layers
    shown = ax.get_images()[0].get_array()
    want = df.pivot_table(index="layer", columns="epoch", values="value").reindex(layers)
    np.testing.assert_allclose(np.ma.getdata(shown), want.to_numpy())
    assert any("RWC" in a.get_ylabel() for a in fig.axes[1:])  # the colour bar says what it shows


def test_every_steps_adds_a_panel(tiny_run) -> None:
    run = tiny_run("model=mlp", "probes=[rwc]", "probes.rwc.every_steps=2")
    fig = FIGURES["rwc_curves"].draw(RunGroup([run]))
    assert "every 2 steps" in fig.axes[1].get_title()
    steps = run.scalars("rwc", "rwc_step")
    assert len(fig.axes[1].get_lines()) == steps["layer"].nunique()


def test_no_figures_without_the_probe(tmp_path: Path) -> None:
    with netprobe.attach(nn.Linear(2, 2), tmp_path / "run", probes=[]):
        pass
    group = RunGroup([netprobe.load(tmp_path / "run")])
    assert all(FIGURES[name].draw(group) is None for name in NAMES)
