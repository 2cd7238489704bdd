"""Comparison figures for a sweep over one key besides the seed (netprobe/plots/compare.py)."""

from __future__ import annotations

import warnings
from pathlib import Path

from netprobe.plots import group_runs, plot
from netprobe.plots.common import RunGroup
from netprobe.plots.compare import COMPARISONS, swept

SMALL = ["model=cnn", "model.width=4", "model.hidden=16", "probes=[gradients]"]


def test_init_sweep_gets_side_by_side_figures(tiny_run, tmp_path: Path):
    # The probes that store weight (source weight) and feature (source train) histograms.
    probes = "probes=[weights,activations]"
    runs = [tiny_run(*SMALL, probes, "init=xavier_normal", f"seed={s}") for s in (0, 1)]
    runs += [tiny_run(*SMALL, probes, "init=orthogonal", "seed=0")]
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
