"""Figures of the activations probe, drawn from a small run trained through the config path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch.nn as nn

import netprobe
from netprobe.plots import plot
from netprobe.plots.common import FIGURES, RunGroup
from netprobe.plots.weights import shared_bins

NAMES = ["activation_distributions", "activation_evolution", "activation_stats"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, train_tiny) -> Path:
    root = tmp_path_factory.mktemp("activations")
    return train_tiny(root / "run", "model=cnn", "probes=[activations]", "trainer.epochs=3")


def test_last_capture_keeps_its_mass_within_its_bins(run_dir: Path) -> None:
    """Bins follow each capture's range: after 3 epochs the features have moved, and still
    under 1 % of each histogram lies outside its bins (counted, not lost)."""
    hists = netprobe.load(run_dir).histograms("activations")
    last = hists[hists["step"] == hists["step"].max()]
    first = hists[hists["step"] == 0]
    assert len(last) == len(first) > 0
    for row in last.itertuples():
        edges, counts = np.asarray(row.edges), np.asarray(row.counts)
        total = counts.sum() + row.below + row.above
        assert (row.below + row.above) / total < 0.01, (row.layer, row.source)
        assert np.all(np.diff(edges) > 0)
    # The bins are the capture's own: they moved with the features.
    moved = [
        not np.allclose(a, b)
        for a, b in zip(first.sort_values(["layer", "source"])["edges"],
                        last.sort_values(["layer", "source"])["edges"])
    ]  # fmt: skip
    assert all(moved)


def test_shared_bins_spread_each_capture_over_one_grid() -> None:
    rows = pd.DataFrame(
        {
            "edges": [np.array([0.0, 1.0, 2.0]), np.array([0.0, 4.0, 8.0])],
            "counts": [np.array([2, 2]), np.array([1, 3])],
            "below": [0, 1],
            "above": [0, 0],
        }
    )
    grid, frac = shared_bins(rows)
    assert grid[0] == 0.0 and grid[-1] == 8.0 and len(grid) == 3 + 30
    # Each capture keeps its in-range share: all of the first, 4 of 5 of the second.
    np.testing.assert_allclose(frac.sum(1), [1.0, 0.8])
    # The first capture lies in [0, 2]; the second spreads 1 of 5 evenly over [0, 4].
    inside = grid[1:] <= 2.0 + 1e-12
    assert frac[0, inside].sum() == pytest.approx(1.0)
    assert frac[1, grid[1:] <= 4.0 + 1e-12].sum() == pytest.approx(0.2)
    # Captures already in the same bins (weights) keep them as they are.
    same = rows.assign(edges=[rows["edges"][0]] * 2)
    grid, frac = shared_bins(same)
    np.testing.assert_array_equal(grid, [0.0, 1.0, 2.0])
    np.testing.assert_allclose(frac, [[0.5, 0.5], [0.2, 0.6]])


def test_figures_render_one_per_source(run_dir: Path, tmp_path: Path) -> None:
    written = plot([run_dir], out=tmp_path, only=NAMES)
    stems = sorted(p.stem for p in written)
    per_source = [f"{n}_{s}" for n in NAMES[:2] for s in ("train", "valid", "random")]
    assert stems == sorted([*per_source, "activation_stats"])
    for path in written:
        assert path.stat().st_size > 5_000, path


def test_distributions_per_module_in_forward_order(run_dir: Path) -> None:
    run = netprobe.load(run_dir)
    figures = FIGURES["activation_distributions"].draw(RunGroup([run]))
    assert list(figures) == ["train", "valid", "random"]
    layers = run.layers()
    with_params = list(dict.fromkeys(layers.loc[layers["param"] != "", "module"]))
    kinds = dict(zip(layers["module"], layers["type"]))
    fig = figures["valid"]
    titles = [ax.get_title().split("\n")[0] for ax in fig.axes if ax.get_title()]
    assert titles == [f"{m} ({kinds[m]})" for m in with_params]
    assert "validation batch" in fig._suptitle.get_text()
    # The titles carry the first → last dead fraction of the source's own scalars.
    stats = run.scalars("activations", "valid/dead_frac")
    first = stats[stats["layer"] == with_params[0]].sort_values("step")["value"].to_numpy()
    assert f"dead {first[0]:.0%} → {first[-1]:.0%}" in fig.axes[0].get_title()


def test_stats_rows_are_sources(run_dir: Path) -> None:
    run = netprobe.load(run_dir)
    fig = FIGURES["activation_stats"].draw(RunGroup([run]))
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == 9 and titles[-1] == "dead units: ≤ 0 for every sample — random"
    dead = run.scalars("activations", "random/dead_frac")
    layer = dead.sort_values("step")["layer"].iloc[0]
    line = fig.axes[8].get_lines()[0]
    want = dead[dead["layer"] == layer].sort_values("step")["value"].to_numpy()
    np.testing.assert_allclose(line.get_ydata(), want)


def test_only_recorded_sources_are_drawn(tiny_run) -> None:
    run = tiny_run("model=mlp", "probes=[activations]", "probes.activations.sources=[random]")
    figures = FIGURES["activation_distributions"].draw(RunGroup([run]))
    assert list(figures) == ["random"]


def test_no_figures_without_the_probe(tmp_path: Path) -> None:
    with netprobe.attach(nn.Linear(2, 2), tmp_path / "run", probes=[]):
        pass
    group = RunGroup([netprobe.load(tmp_path / "run")])
    assert all(FIGURES[name].draw(group) is None for name in NAMES)


def test_one_capture_gets_whole_number_ticks(run_dir: Path) -> None:
    """A run stopped inside its first epoch has only the start capture: the x axis shows epoch
    0, not fractions of an epoch (-0.045, -0.03, ...) printed over one another."""
    run = netprobe.load(run_dir)

    class StartOnly:
        def __getattr__(self, name: str):
            return getattr(run, name)

        def scalars(self, **kwargs) -> pd.DataFrame:
            df = run.scalars(**kwargs)
            return df[df["step"] == 0]

    fig = FIGURES["activation_stats"].draw(RunGroup([StartOnly()]))
    fig.canvas.draw()
    for ax in fig.axes:
        if ax.get_lines():
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert ticks == [0.0], ticks
