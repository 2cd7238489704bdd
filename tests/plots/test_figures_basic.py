"""Training-curve and gradient figures: written from a small stored run, and drawing exactly the
stored values (one run: no smoothing below 200 steps, no averaging)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.legend import Legend

import netprobe
from netprobe.plots import FIGURES, plot
from netprobe.plots.common import RunGroup, fit_titles, layer_bands
from netprobe.store import Run
from tests.helpers import Stopped, netprobe_cmd

BASIC = ["training_curves", "grad_flow_bars", "grad_norms", "grad_heatmap"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, train_tiny) -> Run:
    return netprobe.load(train_tiny(tmp_path_factory.mktemp("basic") / "run", "model=cnn"))


def draw(run: Run, name: str):
    group = RunGroup([run])
    return FIGURES[name].draw(group), group


def layer_rows(run: Run, metric: str) -> pd.DataFrame:
    df = run.scalars(probe="gradients", metric=metric)
    return df[df["layer"] != ""]


def test_every_basic_figure_is_written(run: Run, tmp_path: Path) -> None:
    out = tmp_path / "figs"
    written = plot([run.path], out=out, formats=["png", "svg"], only=BASIC)
    names = {p.name for p in written}
    for name in BASIC:
        assert name in FIGURES
        assert f"{name}.png" in names and f"{name}.svg" in names
    for path in written:
        assert path.stat().st_size > 5000, path
    index = (out / "index.html").read_text()
    for name in BASIC:
        assert f"{name}.png" in index


def test_paths_that_overlap_count_each_run_once(run: Run, tmp_path: Path) -> None:
    """A run given twice, or with the folder holding it, is one run: not averaged with itself."""
    out = tmp_path / "figs"
    plot([run.path, run.path.parent, f"{run.path}/."], out=out, only=["training_curves"])
    groups = json.loads((out / "groups.json").read_text())
    assert [len(g["runs"]) for g in groups] == [1]
    assert "One run (seed 0)" in (out / "index.html").read_text()


def test_an_out_that_cannot_be_created_is_one_line_exit_2(run: Run) -> None:
    done = netprobe_cmd("plot", str(run.path), "--out", "/proc/x", "--only", "training_curves")
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip() == (
        "netprobe: --out /proc/x: cannot create the folder (No such file or directory); "
        "give another --out"
    )
    assert not (run.path / "figures").exists()


def test_training_curves_draw_the_stored_loss_accuracy_and_validation(run: Run) -> None:
    fig, _ = draw(run, "training_curves")
    train = run.scalars(probe="train")
    titles = {ax.get_title(): ax for ax in fig.axes}
    for metric, title, x in [
        ("loss", "train loss", "step"),
        ("acc", "train accuracy", "step"),
        ("val_loss", "validation loss", "epoch"),
        ("val_acc", "validation accuracy", "epoch"),
    ]:
        rows = train[train["metric"] == metric].sort_values(x)
        assert len(rows) > 1, metric
        (line,) = titles[title].get_lines()
        # Validation rows sit at the end of their epoch; the figure counts epochs from 1.
        want_x = rows[x].to_numpy() + (1 if x == "epoch" else 0)
        np.testing.assert_array_equal(line.get_xdata(), want_x)
        np.testing.assert_allclose(line.get_ydata(), rows["value"], rtol=1e-12)
    assert sorted(train.loc[train["metric"] == "val_loss", "epoch"]) == [0, 1]


def test_grad_norms_draw_each_layers_stored_l1_and_l2_per_step(run: Run) -> None:
    fig, _ = draw(run, "grad_norms")
    for ax, metric in zip(fig.axes, ["l1", "l2"]):
        df = layer_rows(run, metric)
        lines = ax.get_lines()
        assert len(lines) == df["layer"].nunique() > 1
        for layer, rows in df.groupby("layer"):
            rows = rows.sort_values("step")
            assert any(
                list(line.get_xdata()) == list(rows["step"])
                and np.allclose(line.get_ydata(), rows["value"], rtol=1e-12, atol=0)
                for line in lines
            ), (metric, layer)


def test_grad_heatmap_is_log10_of_the_stored_l2_layer_by_step(run: Run) -> None:
    fig, group = draw(run, "grad_heatmap")
    df = layer_rows(run, "l2")
    layers = group.ordered(df["layer"])
    want = np.log10(df.pivot(index="layer", columns="step", values="value").loc[layers])
    shown = np.ma.getdata(fig.axes[0].get_images()[0].get_array())
    np.testing.assert_allclose(shown, want.to_numpy(), rtol=1e-12)
    assert sorted(layers) == sorted(df["layer"].unique())


def test_grad_flow_bars_are_the_peak_of_max_and_the_mean_of_mean_per_layer(run: Run) -> None:
    fig, group = draw(run, "grad_flow_bars")
    peak = layer_rows(run, "max_abs").groupby("layer")["value"].max()
    mean = layer_rows(run, "mean_abs").groupby("layer")["value"].mean()
    layers = group.ordered(peak.index)
    ax = fig.axes[0]
    markers = {line.get_marker(): line.get_ydata().astype(float) for line in ax.get_lines()}
    np.testing.assert_allclose(markers["^"], peak.loc[layers], rtol=1e-12)
    np.testing.assert_allclose(markers["o"], mean.loc[layers], rtol=1e-12)
    assert (peak >= mean).all()


def test_a_curves_legend_counts_the_runs_each_point_averages(run: Run) -> None:
    """Where one of two runs has no rows (it stopped earlier), the mean there is of one run: the
    legend says so and from where (the mean may jump there), not n=2."""
    first_epoch_end = int(run.scalars(probe="train", metric="val_loss")["step"].min())
    group = RunGroup([run, Stopped(run, first_epoch_end)])
    fig = FIGURES["training_curves"].draw(group)
    for ax in fig.axes:
        where = "epoch 2" if "validation" in ax.get_title() else f"step {first_epoch_end + 1}"
        assert [t.get_text() for t in ax.get_legend().get_texts()] == [
            f"mean ± std (n=2, 1 from {where})",
            "each run",
        ]
    full = RunGroup([run, run])
    for ax in FIGURES["training_curves"].draw(full).axes:
        assert [t.get_text() for t in ax.get_legend().get_texts()] == [
            "mean ± std (n=2)",
            "each run",
        ]


def test_training_curves_show_each_run_under_the_mean(run: Run) -> None:
    """Seeds that split (one learns, one stops early) read as one spread-out mean in a band
    alone: each run is drawn too, thin and grey, with exactly its own stored values."""
    first_epoch_end = int(run.scalars(probe="train", metric="val_loss")["step"].min())
    fig = FIGURES["training_curves"].draw(RunGroup([run, Stopped(run, first_epoch_end)]))
    ax = next(ax for ax in fig.axes if ax.get_title() == "validation accuracy")
    thin = [line for line in ax.get_lines() if line.get_linewidth() < 1]
    stored = run.scalars(probe="train", metric="val_acc")["value"].to_numpy()
    assert [list(line.get_ydata()) for line in thin] == [list(stored), list(stored[:1])]
    # The run of one epoch is a dot: a line through one point draws nothing.
    assert [line.get_marker() for line in thin] == ["None", "o"]
    single = FIGURES["training_curves"].draw(RunGroup([run]))
    assert not [line for ax in single.axes for line in ax.get_lines() if line.get_linewidth() < 1]


class Diverged(Stopped):
    """`run` as if its training loss had turned NaN at step `last` + 1 and it had stopped."""

    def scalars(self, **kwargs) -> pd.DataFrame:
        df = super().scalars(**kwargs).copy()
        df.loc[(df["step"] == self._last) & (df["metric"] == "loss"), "value"] = np.nan
        return df


def test_training_curves_mark_where_the_loss_went_non_finite(run: Run) -> None:
    """The loss curve of a diverged run ends at its last finite value, marked with an × and the
    step; a run that stopped inside its first epoch says so in the validation panels."""
    group = RunGroup([Diverged(run, 3)])
    fig = FIGURES["training_curves"].draw(group)
    titles = {ax.get_title(): ax for ax in fig.axes}
    loss = run.scalars(probe="train", metric="loss").set_index("step")["value"]
    marks = [line for line in titles["train loss"].get_lines() if line.get_marker() == "x"]
    assert len(marks) == 1
    assert list(marks[0].get_xdata()) == [2]
    np.testing.assert_allclose(marks[0].get_ydata(), [loss[2]], rtol=1e-12)
    legend = titles["train loss"].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["non-finite from step 3"]
    for title in ("validation loss", "validation accuracy"):
        assert [t.get_text() for t in titles[title].texts] == ["no epoch finished"]


class BrokenGradients(Stopped):
    """`run` with one layer's gradient statistics NaN at step 1 and another's inf at step 2."""

    def scalars(self, **kwargs) -> pd.DataFrame:
        df = self._run.scalars(**kwargs).copy()
        grads = (df["probe"] == "gradients") & (df["layer"] != "")
        layers = sorted(df.loc[grads, "layer"].unique())
        if layers:
            df.loc[grads & (df["step"] == 1) & (df["layer"] == layers[0]), "value"] = np.nan
            df.loc[grads & (df["step"] == 2) & (df["layer"] == layers[1]), "value"] = np.inf
        return df


def test_grad_heatmap_paints_a_non_finite_norm_red(run: Run) -> None:
    """Over two runs, a cell where one run's norm is NaN or inf is red over the other run's mean
    (not blank, not a colour scale stretched to infinity)."""
    group = RunGroup([run, BrokenGradients(run, 10**9)])
    fig = FIGURES["grad_heatmap"].draw(group)
    ax = fig.axes[0]
    df = layer_rows(run, "l2")
    layers = group.ordered(df["layer"])
    want = np.log10(df.pivot(index="layer", columns="step", values="value").loc[layers])
    heat, red = ax.get_images()
    # The finite runs' mean under it: here the one intact run's values, everywhere.
    np.testing.assert_allclose(np.ma.getdata(heat.get_array()), want.to_numpy(), rtol=1e-12)
    painted = ~np.ma.getmaskarray(red.get_array()) & np.isfinite(np.ma.getdata(red.get_array()))
    expected = np.zeros_like(painted)
    names = sorted(df["layer"].unique())
    steps = list(want.columns)
    expected[layers.index(names[0]), steps.index(1)] = True
    expected[layers.index(names[1]), steps.index(2)] = True
    np.testing.assert_array_equal(painted, expected)
    assert ax.get_title() == "log10 ‖g‖₂ per layer  (red: NaN or inf)"
    assert len(FIGURES["grad_heatmap"].draw(RunGroup([run])).axes[0].get_images()) == 1


def test_grad_norms_mark_the_first_step_a_norm_went_non_finite(run: Run) -> None:
    group = RunGroup([run, BrokenGradients(run, 10**9)])
    fig = FIGURES["grad_norms"].draw(group)
    for ax in fig.axes:
        marks = [line for line in ax.get_lines() if line.get_label().startswith("non-finite")]
        assert [(m.get_label(), list(m.get_xdata())) for m in marks] == [
            ("non-finite from step 1", [1, 1])
        ]
        for line in ax.get_lines():  # every curve drawn is finite
            assert np.isfinite(np.asarray(line.get_ydata(), float)).all()
    intact = FIGURES["grad_norms"].draw(RunGroup([run]))
    assert not [
        line for ax in intact.axes for line in ax.get_lines() if "non-finite" in line.get_label()
    ]


class NonfiniteValidation(Stopped):
    """`run` as if every validation loss it recorded had been NaN."""

    def scalars(self, **kwargs) -> pd.DataFrame:
        df = self._run.scalars(**kwargs).copy()
        df.loc[df["metric"] == "val_loss", "value"] = np.nan
        return df


def test_training_curves_say_when_recorded_values_are_all_non_finite(run: Run) -> None:
    """A finished epoch whose validation loss is NaN is not "no epoch finished"."""
    fig = FIGURES["training_curves"].draw(RunGroup([NonfiniteValidation(run, 10**9)]))
    titles = {ax.get_title(): ax for ax in fig.axes}
    assert [t.get_text() for t in titles["validation loss"].texts] == ["every value NaN or inf"]
    assert titles["validation accuracy"].get_lines()  # recorded and finite: drawn


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("inside", ["scalars", ".", ".hydra"])
def test_an_out_inside_a_run_but_its_figures_is_refused(run: Run, inside: str) -> None:
    """Figures, index.html and the manifest would land among the run's tables or beside its
    run.json: one line, exit 2, the run byte for byte as it was."""
    before = snapshot(run.path)
    out = run.path / inside
    done = netprobe_cmd("plot", str(run.path), "--out", str(out), "--only", "training_curves")
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip() == (
        f"netprobe: --out {out} is inside the run directory {run.path.resolve()}, where plot "
        f"writes only into {run.path.resolve() / 'figures'}; give that folder or an --out "
        "outside every run"
    )
    assert snapshot(run.path) == before


def test_no_title_runs_off_the_figure_under_a_long_group_title(tiny_run) -> None:
    """A folder of mixed runs gives groups titles of 60 characters of differing keys: every
    figure's titles stay inside it as saved (fit_titles, which plot applies to each)."""
    run = tiny_run("model=cnn", "probes=all")
    detail = "optim=adam, probes=activations+8more, trainer.epochs=2, trainer.max_steps=40"
    group = RunGroup([run], detail=detail)
    drawn = 0
    for name, spec in FIGURES.items():
        rendered = spec.draw(group)
        figures = rendered.values() if isinstance(rendered, dict) else [rendered]
        for fig in [f for f in figures if f is not None]:
            fit_titles(fig)
            fig.canvas.draw()
            renderer, box = fig.canvas.get_renderer(), fig.bbox
            titles = [fig._suptitle, *(ax.title for ax in fig.axes)]
            for text in [t for t in titles if t is not None and t.get_text()]:
                extent = text.get_window_extent(renderer)
                assert box.x0 - 1 <= extent.x0 and extent.x1 <= box.x1 + 1, (name, text.get_text())
            plt.close(fig)
            drawn += 1
    assert drawn > 20


def test_layers_with_equal_values_stay_visible() -> None:
    """Two layers whose values are equal (both zero here) would draw one line over the other
    while the legend lists both: they alternate in dashes and a note names them; a layer apart
    from them, and a log panel whose curves differ, keep their solid lines."""
    steps = np.arange(5)
    values = {"a.weight": 0.0 * steps, "b.weight": 0.0 * steps, "c.weight": 1.0 + steps}
    df = pd.concat(
        pd.DataFrame({"layer": layer, "x": steps, "value": v, "run": 0})
        for layer, v in values.items()
    )
    fig, axes = plt.subplots(1, 3)
    colors = dict(zip(values, ["C0", "C1", "C2"]))
    layer_bands(axes[0], df, colors, 1)
    lines = {line.get_label(): line for line in axes[0].get_lines()}
    a, b, c = (lines[name] for name in values)
    assert c.get_linestyle() == "-"
    assert a.get_linestyle() == b.get_linestyle() == "--"  # dashed, each at its own offset
    (offset_a, dashes_a), (offset_b, dashes_b) = a._unscaled_dash_pattern, b._unscaled_dash_pattern
    assert dashes_a == dashes_b and offset_a != offset_b
    notes = [artist for artist in axes[0].artists if isinstance(artist, Legend)]
    assert [note.get_title().get_text() for note in notes] == [
        "on one another (dashes alternate):\na.weight = b.weight"
    ]
    layer_bands(axes[1], df[df["layer"] != "b.weight"].assign(value=lambda d: d["value"] + 1),
                colors, 1, log=True)  # fmt: skip
    assert {line.get_linestyle() for line in axes[1].get_lines()} == {"-"}
    assert not axes[1].artists
    # A curve that ends earlier (a run stopped sooner) but went the same way hides under the other.
    shorter = df[df["layer"] == "c.weight"].head(3).assign(layer="d.weight")
    layer_bands(axes[2], pd.concat([df, shorter]), {**colors, "d.weight": "C3"}, 1)
    (note,) = axes[2].artists
    assert note.get_title().get_text().splitlines()[1:] == [
        "a.weight = b.weight",
        "c.weight = d.weight",
    ]
    # Curves of one point each (runs that stopped after one epoch) are dots: rings, and named.
    ax = fig.add_subplot()
    layer_bands(ax, df[df["x"] == 0], colors, 1)
    dots = {line.get_label(): line.get_markersize() for line in ax.get_lines()}
    assert dots["a.weight"] > dots["b.weight"] == dots["c.weight"]
    (note,) = ax.artists
    assert note.get_title().get_text().splitlines()[1:] == ["a.weight = b.weight"]
    plt.close(fig)


def test_a_curve_of_one_point_is_drawn(run: Run) -> None:
    """Runs that went non-finite after their first step leave one finite loss each: their mean
    is a dot (a line through one point draws nothing while the legend lists it)."""
    group = RunGroup([Diverged(run, 1), Diverged(run, 1)])
    fig = FIGURES["training_curves"].draw(group)
    ax = next(ax for ax in fig.axes if ax.get_title() == "train loss")
    (curve,) = [line for line in ax.get_lines() if line.get_label() == "mean ± std (n=2)"]
    assert list(curve.get_xdata()) == [0] and curve.get_marker() == "o"


def test_grad_norms_say_which_zero_norms_the_log_axis_left_out(run: Run, train_tiny, tmp_path):
    """A seed whose network is dead (init=zeros: every weight's gradient exactly 0) cannot be
    drawn on the log axis; the figure counts its norms left out, not only a lower n."""
    dead = netprobe.load(train_tiny(tmp_path / "dead", "model=cnn", "init=zeros"))
    zeros = layer_rows(dead, "l2")
    assert (zeros["value"] == 0).all()
    fig = FIGURES["grad_norms"].draw(RunGroup([run, dead]))
    assert fig._supxlabel.get_text() == (  # noqa: SLF001
        f"{len(zeros):,} zero gradient norms (1 of 2 runs, at every step) left out of the "
        "curves: a log axis cannot show 0"
    )
    assert FIGURES["grad_norms"].draw(RunGroup([run]))._supxlabel is None  # noqa: SLF001
    alone = FIGURES["grad_norms"].draw(RunGroup([dead]))
    assert [t.get_text() for ax in alone.axes for t in ax.texts] == ["every norm is 0"] * 2


def test_gradient_figures_show_a_dead_networks_zero_norms_as_zero(train_tiny, tmp_path) -> None:
    """A norm of 0 has no place on a log scale: the flow bars name each layer whose gradient is
    0 throughout and the heatmap paints it black, not a blank axis or a made-up log10 of -30."""
    dead = netprobe.load(train_tiny(tmp_path / "dead", "model=cnn", "init=zeros"))
    layers = layer_rows(dead, "l2")["layer"].unique()
    bars = FIGURES["grad_flow_bars"].draw(RunGroup([dead]))
    assert [t.get_text() for t in bars.axes[0].texts] == ["|g| = 0"] * len(layers)
    heat = FIGURES["grad_heatmap"].draw(RunGroup([dead])).axes[0]
    scale, black = heat.get_images()
    assert np.isnan(np.ma.getdata(scale.get_array())).all()
    assert np.ma.getdata(black.get_array()).tolist() == np.ones(black.get_array().shape).tolist()
    assert heat.get_title() == "log10 ‖g‖₂ per layer  (black: 0)"


def test_a_legend_names_the_exact_step_where_its_count_changes() -> None:
    """Past a million steps the step is still written whole, not as 1.2e+06."""
    from netprobe.plots.common import band

    fig, ax = plt.subplots()
    x = np.array([1_199_998, 1_199_999, 1_200_000])
    band(ax, x, np.ones(3), np.zeros(3), np.array([2, 1, 1]), label="mean", unit="step")
    assert ax.get_lines()[0].get_label() == "mean (n=2, 1 from step 1199999)"
    plt.close(fig)
