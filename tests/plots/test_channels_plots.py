"""The channel boxplots, drawn from tiny runs trained through the real config path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch.nn as nn

import netprobe
from netprobe.plots import plot
from netprobe.plots.common import FIGURES, RunGroup


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, train_seeds) -> Path:
    root = tmp_path_factory.mktemp("channels")
    return train_seeds(root, "model=cnn", "probes=[channels]", "probes.channels.at=[start,end]")


def test_stored_vectors_and_scalars(runs: Path) -> None:
    run = netprobe.load(runs / "seed0")
    df = run.matrices("channels")
    assert set(df["step"]) == {0, run.info["steps_done"]}
    at_end = df[df["step"] == run.info["steps_done"]]
    shapes = {(n, r): tuple(s) for n, r, s in zip(at_end["name"], at_end["row"], at_end["shape"])}
    # cnn: conv 3→32, 32→64, 64→64
    assert shapes[("emission", "features.0")] == (32,)
    assert shapes[("absorption", "features.0")] == (3,)
    assert shapes[("absorption", "features.6")] == (64,)
    scalars = run.scalars("channels")
    assert set(scalars["metric"]) == {"em_mean", "em_std", "ab_mean", "ab_std"}
    assert np.isfinite(scalars["value"]).all()


def test_figure_renders(runs: Path, tmp_path: Path) -> None:
    written = plot([runs], out=tmp_path, only=["channel_boxplots"])
    assert [p.name for p in written] == ["channel_boxplots.png"]
    assert written[0].stat().st_size > 15_000


def test_absorption_above_emission_below_in_forward_order(runs: Path) -> None:
    fig = FIGURES["channel_boxplots"].draw(RunGroup(netprobe.load_runs(runs)))
    top, bottom = fig.axes[:2]
    assert "absorption" in top.get_ylabel() and "emission" in bottom.get_ylabel()
    labels = [t.get_text() for t in bottom.get_xticklabels()]
    assert labels == ["features.0", "features.3", "features.6"]
    legend = [t.get_text() for t in top.get_legend().get_texts()]
    assert legend == ["before training", "after epoch 2"]
    assert "pooled over 2 runs" in top.get_legend().get_title().get_text()


def test_no_figure_without_the_probe(tmp_path: Path) -> None:
    with netprobe.attach(nn.Linear(2, 2), tmp_path / "run", probes=[]):
        pass
    assert FIGURES["channel_boxplots"].draw(RunGroup([netprobe.load(tmp_path / "run")])) is None
