"""Figures of the activations probe, drawn from a small run trained through the config path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch.nn as nn

import netprobe
from netprobe.plots import plot
from netprobe.plots.common import FIGURES, RunGroup

NAMES = ["activation_distributions", "activation_evolution", "activation_stats"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, train_tiny) -> Path:
    root = tmp_path_factory.mktemp("activations")
    return train_tiny(root / "run", "model=cnn", "probes=[activations]")


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
