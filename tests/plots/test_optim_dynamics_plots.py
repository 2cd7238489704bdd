"""Figures of optim_dynamics, drawn from small stored runs trained through the real config path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

import netprobe
from netprobe.plots import plot
from netprobe.plots.common import FIGURES, RunGroup
from netprobe.plots.optim_dynamics import sign_matrix
from netprobe.probes.optim_dynamics import METRICS, UNPAIRED_METRICS
from tests.helpers import train_steps

NAMES = ["optim_dynamics_curves", "grad_sign_map", "grad_sign_map_zoom"]


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory: pytest.TempPathFactory, train_seeds) -> Path:
    root = tmp_path_factory.mktemp("optim_dynamics")
    return train_seeds(root, "model=cnn", "probes=[optim_dynamics]")


def test_stored_metrics_and_sign_map(two_seeds: Path) -> None:
    run = netprobe.load(two_seeds / "seed0")
    scalars = run.scalars("optim_dynamics")
    assert set(scalars.loc[scalars["step"] == 0, "metric"]) == set(UNPAIRED_METRICS)
    assert set(scalars.loc[scalars["step"] == 1, "metric"]) == set(METRICS)
    assert scalars["step"].nunique() == run.info["steps_done"]
    matrices = run.matrices("optim_dynamics")
    sign_map = matrices[matrices["name"] == "sign_map"]
    layers = scalars["layer"].unique()
    # Per epoch and tracked tensor a [steps, 64] block: every step of these short epochs.
    assert len(sign_map) == 2 * len(layers)
    assert set(sign_map["row"]) == set(layers)
    steps = matrices[matrices["name"] == "sign_steps"]
    assert sorted(int(s) for v in steps["values"] for s in v) == list(range(run.info["steps_done"]))
    for shape, values in zip(sign_map["shape"], sign_map["values"]):
        assert shape[1] == 64 and len(values) == shape[0] * 64
        assert set(np.unique(values)) <= {-1.0, 0.0, 1.0, 2.0}


def test_stored_sign_map_tells_the_four_codes_apart(tmp_path: Path) -> None:
    """A linear layer whose gradients are, by construction, exactly zero (inputs 0), small
    positive or negative (inputs 1e-7) and large (inputs 1): the stored codes say which."""
    model = nn.Sequential(nn.Linear(6, 2, bias=False))
    x = torch.tensor([[0.0, 0.0, 1e-7, 2e-7, 1.0, 2.0]] * 4)
    sign = torch.tensor([1.0, -1.0])
    loss_fn = lambda out, _y: (out * sign).sum()  # noqa: E731 - ∂L/∂W[j, i] = sign_j · Σ_b x_bi
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    probes = {"optim_dynamics": {"sign_samples": 12}}
    batch = (x, torch.zeros(4, dtype=torch.long))
    run_dir = tmp_path / "run"
    with netprobe.attach(model, run_dir, probes=probes, probe_batch=batch, loss_fn=loss_fn) as mon:
        train_steps(mon, model, opt, [(x, None)] * 3, loss_fn)
        mon.end_epoch()
    run = netprobe.load(tmp_path / "run")
    group = RunGroup([run])
    codes, steps, epochs, widths = sign_matrix(run.matrices("optim_dynamics"), ["0.weight"])
    assert list(steps) == [0, 1, 2] and list(epochs) == [0, 0, 0] and widths == [12]
    grad = sign[:, None] * x.sum(0)[None, :]
    want = [
        0.0 if g == 0 else 2.0 if abs(g) > 1e-5 else float(np.sign(g)) for g in grad.numpy().ravel()
    ]
    for row in codes:
        np.testing.assert_array_equal(row, want)
    assert set(want) == {-1.0, 0.0, 1.0, 2.0}
    fig = FIGURES["grad_sign_map"].draw(group)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    # The legend gives each code's share: 4 of 12 exactly zero, 2 small of each sign, 4 large.
    assert [label.rsplit("(", 1)[1] for label in labels] == ["16.7%)", "16.7%)", "33.3%)", "33.3%)"]


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


def test_sign_matrix_stacks_steps_by_layers() -> None:
    rows = pd.DataFrame(
        {
            "step": [3, 3, 3, 7, 7],
            "epoch": [0, 0, 0, 1, 1],
            "name": ["sign_steps", "sign_map", "sign_map", "sign_steps", "sign_map"],
            "row": ["", "b", "a", "", "a"],
            "shape": [[2], [2, 2], [2, 3], [1], [1, 3]],
            "values": [
                np.array([1.0, 3.0]),
                np.array([1.0, 0.0, 2.0, 2.0]),
                np.array([-1.0, 0, 1, 0, 0, 0]),
                np.array([6.0]),
                np.array([2.0, 2, 2]),
            ],
        }
    )
    codes, steps, epochs, widths = sign_matrix(rows, ["a", "b"])
    assert widths == [3, 2] and list(steps) == [1, 3, 6] and list(epochs) == [0, 0, 1]
    np.testing.assert_array_equal(codes[0], [-1, 0, 1, 1, 0])
    np.testing.assert_array_equal(codes[1], [0, 0, 0, 2, 2])
    # Layer b has no row at step 6: left blank rather than invented.
    np.testing.assert_array_equal(codes[2, :3], [2, 2, 2])
    assert np.isnan(codes[2, 3:]).all()
