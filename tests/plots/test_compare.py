"""Comparison figures for a sweep over one key besides the seed (netprobe/plots/compare.py)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from netprobe.plots import group_runs, plot
from netprobe.plots.common import RunGroup
from netprobe.plots.compare import COMPARISONS, swept
from netprobe.store import rows_table

SMALL = ["model=cnn", "model.width=4", "model.hidden=16", "probes=[gradients]"]


def add_histograms(run, shift: float) -> None:
    """Stored histograms as the weights and activations probes write them: weights per tensor
    (source weight) and layer outputs (source train), at the first and the last step."""
    last = int(run.scalars(metric="loss")["step"].max()) + 1
    edges = np.linspace(-1, 1, 21).tolist()
    rng = np.random.default_rng(0)
    rows = []
    for probe, source, layers in (
        ("weights", "weight", ["features.0.weight", "features.3.weight", "classifier.3.weight"]),
        ("activations", "train", ["features.0", "features.3", "classifier.3"]),
    ):
        for step, centre in ((0, 0.0), (last, shift)):
            for layer in layers:
                values = rng.normal(centre, 0.3, 500)
                counts, _ = np.histogram(values, bins=edges)
                rows.append({"step": step, "epoch": 0 if step == 0 else 1, "probe": probe,
                             "layer": layer, "source": source, "edges": edges,
                             "counts": counts.tolist(), "below": int((values < -1).sum()),
                             "above": int((values > 1).sum())})  # fmt: skip
    (run.path / "histograms").mkdir()
    pq.write_table(rows_table("histograms", rows), run.path / "histograms" / "part-000000.parquet")


def test_init_sweep_gets_side_by_side_figures(tiny_run, tmp_path: Path):
    runs = [tiny_run(*SMALL, "init=xavier_normal", f"seed={s}") for s in (0, 1)]
    runs += [tiny_run(*SMALL, "init=orthogonal", "seed=0")]
    for run, shift in zip(runs, (0.3, 0.3, -0.4)):
        add_histograms(run, shift)
    sweep = swept(group_runs(runs))
    assert sweep.key == "init" and sweep.labels == ["orthogonal", "xavier_normal"]
    assert [g.n for g in sweep.groups] == [1, 2]

    out = tmp_path / "figs"
    written = plot([r.path for r in runs], out=out, only=list(COMPARISONS))
    for name in COMPARISONS:
        path = out / "compare" / f"{name}.png"
        assert path in written and path.stat().st_size > 10_000, name
    assert "Comparison: init sweep" in (out / "index.html").read_text()
    # Group folders are named by the option alone, not by the keys that come with it.
    plot([r.path for r in runs], out=out, only=["training_curves"])
    assert (out / "init=orthogonal" / "training_curves.png").exists()


def test_comparisons_without_histograms_skip_the_distributions(tiny_run, tmp_path: Path):
    runs = [tiny_run(*SMALL, f"optim.lr={lr}", "trainer.epochs=1") for lr in (0.01, 0.001)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing fails: absent data just draws nothing
        written = plot([r.path for r in runs], out=tmp_path, only=list(COMPARISONS))
    names = sorted(p.name for p in written)
    assert names == ["compare_curves.png", "compare_final.png"]


def test_swept_orders_numbers_numerically_and_names_several_keys():
    def group(**varying) -> RunGroup:
        return RunGroup([], label=",".join(f"{k}={v}" for k, v in varying.items()), varying=varying)

    lrs = swept([group(**{"optim.lr": v}) for v in (0.1, 0.001, 0.01)])
    assert lrs.key == "optim.lr" and lrs.labels == ["0.001", "0.01", "0.1"]
    both = swept([group(**{"model.name": m, "data.name": d}) for m, d in
                  (("cnn", "mnist"), ("mlp", "digits"))])  # fmt: skip
    assert both.key == "data, model" and both.labels[0] == "model.name=cnn,data.name=mnist"
    assert swept([group(seed=0)]) is None
