"""Comparison figures for a sweep over one key besides the seed (netprobe/plots/compare.py)."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from matplotlib.collections import PathCollection

from netprobe.plots import FIGURES, group_runs, plot
from netprobe.plots.common import CompactFormatter, RunGroup
from netprobe.plots.compare import COMPARISONS, Sweep, compare_curves, compare_final, swept
from netprobe.plots.weights import LAST
from netprobe.store import Results
from tests.helpers import Stopped, crash

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


def test_a_group_whose_runs_stopped_apart_is_drawn_alike_in_both_curve_figures(tiny_run):
    """A seed that stopped an epoch earlier (its target accuracy met) leaves the count, not the
    curve: compare_curves draws the group's mean at every step, as training_curves does, with the
    same values and the same count in the legend (`n=2, 1 from step 8`)."""
    runs = [tiny_run(*SMALL, "trainer.epochs=3", f"seed={s}") for s in (0, 1)]
    first_epoch_end = int(runs[1].scalars(probe="train", metric="val_loss")["step"].min())
    stopped = RunGroup([runs[0], Stopped(runs[1], first_epoch_end)])
    sweep = Sweep("init", [stopped, RunGroup([runs[0]])], ["early", "whole"])

    def curves(fig) -> dict[str, tuple[list, np.ndarray]]:
        return {
            ax.get_title(): (list(line.get_xdata()), np.asarray(line.get_ydata(), float))
            for ax in fig.axes
            for line in ax.get_lines()
            if re.fullmatch(
                r"(early|mean ± std) \(n=2, 1 from (step|epoch) \d+\)", line.get_label()
            )
        }

    compared, alone = (
        curves(compare_curves(sweep)),
        curves(FIGURES["training_curves"].draw(stopped)),
    )
    assert sorted(compared) == sorted(alone) == sorted(["train loss", "train accuracy",
        "validation loss", "validation accuracy"])  # fmt: skip
    last_step = int(runs[0].scalars(probe="train", metric="loss")["step"].max())
    assert compared["train loss"][0][-1] == last_step > first_epoch_end
    for title, (x, y) in compared.items():
        assert x == alone[title][0], title
        np.testing.assert_allclose(y, alone[title][1], rtol=1e-12)


class FirstCaptureOnly(Stopped):
    """`run` as if it had stopped before its first epoch ended (diverged at once): of its
    histograms only the first capture."""

    def histograms(self, *args, **kwargs):
        df = self._run.histograms(*args, **kwargs)
        return df[df["step"] == df["step"].min()]


def test_before_after_says_each_values_captures_and_draws_no_after_it_lacks(tiny_run):
    """A swept value whose run stopped before its first epoch ended has one capture: its column
    says so and draws it alone, not twice as "before" and "after"; the weights' own grid too."""
    runs = [tiny_run(*SMALL, "probes=[weights]", f"optim.lr={lr}") for lr in (0.01, 0.02)]
    last = int(runs[0].histograms(probe="weights")["step"].max())
    sweep = Sweep("optim.lr", [RunGroup([runs[0]]), RunGroup([FirstCaptureOnly(runs[1], 0)])],
                  ["0.01", "0.02"])  # fmt: skip
    fig = COMPARISONS["compare_weights"].draw(sweep)
    ncols = 2
    assert [ax.get_title() for ax in fig.axes[:ncols]] == [f"0.01\nstep 0 → {last}",
                                                           "0.02\nstep 0 only"]  # fmt: skip

    def outlines(ax) -> int:
        return sum(line.get_color() == LAST for line in ax.get_lines())

    assert all(outlines(ax) == 1 for ax in fig.axes[0::ncols])
    assert all(outlines(ax) == 0 for ax in fig.axes[1::ncols])
    grid = FIGURES["weights_histograms"].draw(RunGroup([FirstCaptureOnly(runs[1], 0)]))
    assert [t.get_text() for t in grid.legends[0].get_texts()] == [
        "before training, the only capture"
    ]
    assert not any(outlines(ax) for ax in grid.axes)
    assert all("→" not in ax.get_title() for ax in grid.axes)


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


@dataclass
class FinalOnly:
    """What compare_final reads of a run: its run.json, and its status."""

    info: dict
    status: str = "completed"

    def results(self) -> Results:
        return Results(self.info["final"], True, None)


def final_sweep(labels: list[str], key: str) -> Sweep:
    def group(i: int) -> RunGroup:
        final = {"val_acc": 0.1 + 0.01 * i, "val_loss": 2.3025 + 0.0005 * i}
        return RunGroup([FinalOnly({"model": "cnn", "data": "synthetic", "final": final})])

    return Sweep(key, [group(i) for i in range(len(labels))], labels)


def inside(box, outer) -> bool:
    return box.x0 >= outer.x0 - 1 and box.x1 <= outer.x1 + 1 and box.y0 >= outer.y0 - 1


@pytest.mark.parametrize("count", [2, 6])
def test_compare_final_labels_are_whole_apart_and_inside_the_figure(count: int) -> None:
    """Every tick label names each key of its value in full; titles, labels and ticks stay in
    the figure, the two panels' tick labels never overlap, and close losses read apart."""
    labels = [
        f"init=orthogonal,optim.lr=0.00{i + 1},trainer.schedule=cosine{i}" for i in range(count)
    ]
    key = "init, optim.lr, trainer.schedule, " + ", ".join(f"probes.p{i}.every" for i in range(8))
    fig = compare_final(final_sweep(labels, key))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ticks = [[t for t in ax.get_xticklabels() if t.get_text()] for ax in fig.axes]
    for panel in ticks:
        shown = [" ".join(t.get_text().split()).replace(",", " ") for t in panel]
        for label, text in zip(labels, shown):
            assert all(part in text for part in label.split(",")), (label, text)
    boxes = [[t.get_window_extent(renderer) for t in panel] for panel in ticks]
    texts = [fig._suptitle, fig._supxlabel]  # noqa: SLF001
    for box in [*boxes[0], *boxes[1], *(t.get_window_extent(renderer) for t in texts)]:
        assert inside(box, fig.bbox), box
    assert not any(a.overlaps(b) for a in boxes[0] for b in boxes[1])
    assert not any(a.overlaps(b) for a in boxes[0] for b in boxes[0] if a is not b)
    loss_ticks = [t.get_text() for t in fig.axes[1].get_yticklabels() if t.get_text()]
    assert len(set(loss_ticks)) == len(loss_ticks), loss_ticks


def test_tick_labels_tell_close_values_apart() -> None:
    formatter = CompactFormatter()
    assert formatter.format_ticks([2.3025, 2.303, 2.3035]) == ["2.3025", "2.303", "2.3035"]
    assert formatter.format_ticks([-0.1, 1.4e-17, 0.1]) == ["-0.1", "0", "0.1"]
    assert formatter.format_ticks([2e-5, 4e-5, 1.2e4]) == ["2e-5", "4e-5", "1.2e4"]


def test_compare_final_says_why_a_value_has_no_bar() -> None:
    """A value whose runs left no final result (one diverged) is named with their status in
    both panels, where its bar or point would be."""
    sweep = final_sweep(["0.001", "1000"], "optim.lr")
    sweep.groups[1].runs[0] = FinalOnly({"final": {}}, status="diverged")
    fig = compare_final(sweep)
    for ax in fig.axes:
        notes = [t for t in ax.texts if t.get_text().startswith("no final value")]
        assert [(t.get_text(), t.get_position()[0]) for t in notes] == [
            ("no final value\n(diverged)", 1)
        ]


def test_compare_final_shows_a_killed_runs_last_values_apart_from_the_final_ones(tiny_run):
    """A run killed before it closed has no final value: its last recorded values are drawn as
    hollow dots, left out of the mean, and its value's tick label counts it as crashed."""
    runs = [tiny_run(*SMALL, "init=xavier_normal", f"seed={s}") for s in (0, 1)]
    runs[1] = crash(runs[1].path)
    last = runs[1].results().values
    fig = compare_final(Sweep("init", [RunGroup(runs)], ["xavier_normal"]))
    for ax, metric in zip(fig.axes, ("val_acc", "val_loss")):
        dots = [c for c in ax.collections if isinstance(c, PathCollection)]
        hollow = [c for c in dots if len(c.get_offsets()) and not c.get_facecolors().any()]
        assert [list(c.get_offsets()[:, 1]) for c in hollow] == [[last[metric]]]
        assert ax.get_xticklabels()[0].get_text() == "xavier_normal\n(n=2, 1 crashed)"
    assert fig.axes[0].patches[0].get_height() == runs[0].info["final"]["val_acc"]
    assert "not final, left out of the mean" in " ".join(fig._supxlabel.get_text().split())  # noqa: SLF001


def test_a_run_that_died_since_the_last_plot_is_redrawn_as_crashed(tiny_run, tmp_path, monkeypatch):
    """A kill -9 leaves a running run's files as they were; its status alone changes, and the
    figures that name it (`1 running`) are drawn again (`1 crashed`), not kept as unchanged."""
    import netprobe.lifecycle

    runs = [tiny_run(*SMALL, "init=xavier_normal", f"seed={s}") for s in (0, 1)]
    runs += [tiny_run(*SMALL, "init=orthogonal", "seed=0")]
    runs[1] = crash(runs[1].path)
    out = tmp_path / "figs"
    stamps = []
    for alive in (True, False):
        monkeypatch.setattr(netprobe.lifecycle, "process_alive", lambda *a, alive=alive: alive)
        assert runs[1].status == ("running" if alive else "crashed")
        plot([r.path for r in runs], out=out, only=["compare_final"])
        stamps.append((out / "compare" / "compare_final.png").stat().st_mtime_ns)
    assert stamps[0] != stamps[1]


class Raised(Stopped):
    """`run` with its accuracies raised by `by`: a value whose curves differ by a hair."""

    def __init__(self, run, by: float) -> None:
        super().__init__(run, 10**9)
        self._by = by

    def scalars(self, *args, **kwargs):
        df = super().scalars(*args, **kwargs)
        return df.assign(
            value=df["value"].where(~df["metric"].str.contains("acc"), df["value"] + self._by)
        )


def test_accuracy_curves_a_line_width_apart_on_the_panel_are_revealed(tiny_run) -> None:
    """Closeness is judged on the panel as drawn: accuracies 0.4% apart on the 0–1 axis lie
    within a line's width of one another, however far apart they are within their own range."""
    run = tiny_run(*SMALL, "trainer.epochs=3")
    sweep = Sweep("init", [RunGroup([run]), RunGroup([Raised(run, 0.004)])], ["a", "b"])
    fig = compare_curves(sweep)
    for ax in fig.axes:
        if "accuracy" in ax.get_title():
            assert {line.get_linestyle() for line in ax.get_lines()} == {"--"}, ax.get_title()
