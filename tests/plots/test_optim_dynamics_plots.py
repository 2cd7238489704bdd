"""Figures of optim_dynamics, drawn from small stored runs trained through the real config path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch.nn as nn

import netprobe
from netprobe.plots import plot
from netprobe.plots.common import FIGURES, RunGroup
from netprobe.plots.optim_dynamics import sign_matrix
from netprobe.probes.optim_dynamics import FIRST_METRICS, METRICS

NAMES = ["optim_dynamics_curves", "grad_sign_map", "grad_sign_map_zoom"]


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory: pytest.TempPathFactory, train_seeds) -> Path:
    root = tmp_path_factory.mktemp("optim_dynamics")
    return train_seeds(root, "model=cnn", "probes=[optim_dynamics]")


def test_stored_metrics_and_sign_map(two_seeds: Path) -> None:
    run = netprobe.load(two_seeds / "seed0")
    scalars = run.scalars("optim_dynamics")
    assert set(scalars.loc[scalars["step"] == 0, "metric"]) == set(FIRST_METRICS)
    assert set(scalars.loc[scalars["step"] == 1, "metric"]) == set(METRICS)
    assert scalars["step"].nunique() == run.info["steps_done"]
    sign_map = run.matrices("optim_dynamics", "sign_map")
    layers = scalars["layer"].unique()
    # One row per tracked tensor per epoch, K = 64 codes in {-1, 0, 1}.
    assert len(sign_map) == 2 * len(layers)
    assert set(sign_map["row"]) == set(layers)
    assert all(len(v) == 64 and set(np.unique(v)) <= {-1.0, 0.0, 1.0} for v in sign_map["values"])


def test_figures_render(two_seeds: Path, tmp_path: Path) -> None:
    written = plot([two_seeds], out=tmp_path, only=NAMES)
    assert sorted(p.stem for p in written) == sorted(NAMES)
    for path in written:
        assert path.stat().st_size > 5_000, path


def test_curves_average_over_seeds(two_seeds: Path) -> None:
    group = RunGroup(netprobe.load_runs(two_seeds))
    fig = FIGURES["optim_dynamics_curves"].draw(group)
    labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert labels and all(label.endswith("(n=2)") for label in labels)
    assert "2 seeds" in fig.legends[0].get_title().get_text()


def test_no_figures_without_the_probe(tmp_path: Path) -> None:
    with netprobe.attach(nn.Linear(2, 2), tmp_path / "run", probes=[]):
        pass
    group = RunGroup([netprobe.load(tmp_path / "run")])
    assert all(FIGURES[name].draw(group) is None for name in NAMES)


def test_sign_matrix_stacks_epochs_by_layers() -> None:
    rows = pd.DataFrame(
        {
            "epoch": [0, 0, 1],
            "row": ["b", "a", "a"],
            "values": [np.array([1.0, 0.0]), np.array([-1.0, 0, 1]), np.array([0.0, 0, 0])],
        }
    )
    codes, epochs, widths = sign_matrix(rows, ["a", "b"])
    assert widths == [3, 2] and list(epochs) == [0, 1]
    np.testing.assert_array_equal(codes[0], [-1, 0, 1, 1, 0])
    # Layer b has no row in epoch 1: left blank rather than invented.
    np.testing.assert_array_equal(codes[1, :3], [0, 0, 0])
    assert np.isnan(codes[1, 3:]).all()
