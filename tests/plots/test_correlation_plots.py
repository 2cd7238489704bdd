"""Figures of the correlation probe, drawn from tiny runs trained through the real config path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch.nn as nn

import netprobe
from netprobe.plots import plot
from netprobe.plots.common import FIGURES, RunGroup
from netprobe.plots.correlation import CORR_CMAP, epochs_done, pair_matrix

NAMES = ["corr_mean_heatmap", "cka_heatmap", "corr_mean_evolution", "correlation_grid"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, train_seeds) -> Path:
    root = tmp_path_factory.mktemp("correlation")
    train_seeds(root / "cnn", "model=cnn", "probes=[correlation]")
    return root


def test_stored_pairs_and_full_matrices(runs: Path) -> None:
    run = netprobe.load(runs / "cnn" / "seed0")
    means = run.matrices("correlation", "corr_mean")
    names = list(dict.fromkeys(means["row"]))
    assert names == ["features.0", "features.3", "features.6", "classifier.1", "classifier.3"]
    # start + 2 epochs, each with every pair i ≤ j once
    assert means.groupby("step").size().tolist() == [15, 15, 15]
    full = run.matrices("correlation", "C")
    # Full matrices before training and at the end, which follows the second (last) epoch.
    assert set(epochs_done(full["step"], full["epoch"])) == {0, 2}
    values = np.concatenate(full["values"].to_list())
    assert np.isfinite(values).all() and np.abs(values).max() <= 1 + 1e-5


def test_figures_render(runs: Path, tmp_path: Path) -> None:
    written = plot([runs], out=tmp_path, only=NAMES)
    stems = sorted({p.stem for p in written})
    expected = ["cka_heatmap", "corr_mean_evolution", "corr_mean_heatmap"]
    expected += ["correlation_grid_epoch0002", "correlation_grid_start"]
    assert stems == sorted(expected) and len(written) == len(expected)
    for path in written:
        assert path.stat().st_size > 8_000, path


def test_heatmaps_average_seeds_and_keep_forward_order(runs: Path) -> None:
    group = RunGroup(netprobe.load_runs(runs / "cnn"))
    fig = FIGURES["cka_heatmap"].draw(group)
    first = fig.axes[0]
    labels = [t.get_text() for t in first.get_yticklabels()]
    assert labels[0].startswith("features.0") and labels[-1].startswith("classifier.3")
    assert "mean of 2 runs" in first.get_title()
    grid = FIGURES["correlation_grid"].draw(group)
    image = grid["start"].axes[0].images[0]
    assert image.get_cmap().name == CORR_CMAP and image.norm.vmin == -1 and image.norm.vmax == 1


def test_pair_matrix_mirrors_the_upper_triangle() -> None:
    rows = pd.DataFrame(
        {"row": ["a", "a", "b"], "col": ["a", "b", "b"], "values": [[1.0], [0.3], [0.5]]}
    )
    np.testing.assert_allclose(pair_matrix(rows, ["a", "b"]), [[1.0, 0.3], [0.3, 0.5]])


def test_no_figures_without_the_probe(tmp_path: Path) -> None:
    with netprobe.attach(nn.Linear(2, 2), tmp_path / "run", probes=[]):
        pass
    group = RunGroup([netprobe.load(tmp_path / "run")])
    assert all(FIGURES[name].draw(group) is None for name in NAMES)


def test_each_cka_estimator_draws_its_stored_matrix(tiny_run) -> None:
    run = tiny_run("model=cnn", "probes=[correlation]", "probes.correlation.cka=both")
    group = RunGroup([run])
    for name, word in (("cka", "biased"), ("cka_unbiased", "unbiased")):
        figure = FIGURES[f"{name}_heatmap"]
        assert f"{word} HSIC estimator" in figure.caption
        fig = figure.draw(group)
        assert f", {word} HSIC" in fig._suptitle.get_text()
        last = fig.axes[1].images[0].get_array()
        np.testing.assert_allclose(last, run.matrix(name).to_numpy(), rtol=1e-12)
