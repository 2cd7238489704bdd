"""Figures of the augmentation probe, drawn from tiny runs trained through the real config path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch.nn as nn

import netprobe
from netprobe.plots import plot
from netprobe.plots.augmentation import to_images
from netprobe.plots.common import FIGURES, RunGroup
from netprobe.plots.correlation import CORR_CMAP

NAMES = ["augmentation_correlations", "augmentation_inputs"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, train_tiny) -> Path:
    root = tmp_path_factory.mktemp("augmentation")
    for model, channels in (("cnn", 3), ("mlp", 1)):
        train_tiny(
            root / model,
            f"model={model}",
            f"data.channels={channels}",
            "probes=[augmentation]",
            "probes.augmentation.samples=40",
            "probes.augmentation.show=7",
        )
    return root


def test_stored_matrices(runs: Path) -> None:
    run = netprobe.load(runs / "cnn")
    df = run.matrices("augmentation")
    shapes = {(n, r): tuple(s) for n, r, s in zip(df["name"], df["row"], df["shape"])}
    assert shapes[("sample_corr", "features.0")] == (40, 40)
    assert shapes[("feature_corr", "features.0")] == (32, 32)
    assert shapes[("feature_corr", "classifier.3")] == (10, 10)
    assert shapes[("inputs", "")] == (7, 3, 8, 8) and shapes[("original", "")] == (3, 8, 8)
    assert set(df["step"]) == {run.info["steps_done"]}  # one capture, at the end
    inv = run.scalars("augmentation", "invariance")
    assert list(inv["layer"]) == ["features.0", "classifier.3"]
    assert np.isfinite(inv["value"]).all() and (inv["value"] >= 0).all()


def test_figures_render(runs: Path, tmp_path: Path) -> None:
    written = plot([runs], out=tmp_path, only=NAMES)
    assert len(written) == 2 * len(NAMES)  # two groups: cnn in colour, mlp in grey
    for path in written:
        assert path.stat().st_size > 8_000, path


def test_heatmaps_take_their_colour_scale_from_the_data(runs: Path) -> None:
    fig = FIGURES["augmentation_correlations"].draw(RunGroup([netprobe.load(runs / "cnn")]))
    heatmaps = [ax for ax in fig.axes if ax.images]
    assert len(heatmaps) == 4
    for ax in heatmaps:
        image = ax.images[0]
        block = np.asarray(image.get_array())
        off = block[~np.eye(*block.shape, dtype=bool)]
        lo, hi = np.percentile(off, [1, 99])
        # Diverging around 0 when the correlations take both signs, else the data's own span.
        if lo < 0 < hi:
            assert image.get_cmap().name == CORR_CMAP
            assert image.norm.vmax == pytest.approx(max(-lo, hi)) == -image.norm.vmin
        else:
            assert (image.norm.vmin, image.norm.vmax) == pytest.approx((lo, hi))
        assert "invariance" in ax.get_title()
    assert heatmaps[0].get_title().startswith("first layer features.0")
    assert heatmaps[2].get_title().startswith("last layer classifier.3")


def test_to_images_scales_jointly() -> None:
    stack = np.stack([np.zeros((3, 2, 2)), np.full((3, 2, 2), 4.0)])
    rgb = to_images(stack, 0.0, 4.0)
    assert rgb[0].shape == (2, 2, 3) and rgb[0].max() == 0 and rgb[1].min() == 1
    grey = to_images(stack[:, :1], 0.0, 4.0)
    assert grey[1].shape == (2, 2)


def test_no_figures_without_the_probe(tmp_path: Path) -> None:
    with netprobe.attach(nn.Linear(2, 2), tmp_path / "run", probes=[]):
        pass
    group = RunGroup([netprobe.load(tmp_path / "run")])
    assert all(FIGURES[name].draw(group) is None for name in NAMES)
