"""What every figure family shares: run groups, seed aggregation, the figure registry."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.legend import Legend  # noqa: E402
from matplotlib.ticker import Formatter, MaxNLocator  # noqa: E402

from netprobe.store import Run  # noqa: E402

Rendered = Figure | dict[str, Figure] | None


@dataclass
class RunGroup:
    """Runs that differ only by seed, drawn together: curves show mean ± std over them."""

    runs: list[Run]
    label: str = ""
    varying: dict[str, Any] = field(default_factory=dict)
    # What tells this group apart beyond model, data and init (which the title always names).
    detail: str = ""

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def seed_note(self) -> str:
        """Names the run a one-run figure draws, e.g. `seed 0 (1 of 3 runs)`."""
        seed = self.runs[0].info.get("seed")
        return f"seed {seed}" + (f" (1 of {self.n} runs)" if self.n > 1 else "")

    @property
    def title(self) -> str:
        info = self.runs[0].info
        head = f"{info.get('model', '?')} on {info.get('data', '?')}, init {info.get('init', '?')}"
        # Cut so that a title fits above the narrowest figure; groups.json and the report page
        # name every differing key in full.
        detail = self.detail if len(self.detail) <= 60 else self.detail[:59] + "…"
        return f"{head} ({detail})" if detail else head

    def probe_config(self, probe: str) -> dict[str, Any]:
        """The first run's config of `probe` (its options as composed), {} without one."""
        return ((self.runs[0].config or {}).get("probes") or {}).get(probe) or {}

    def scalars(self, probe: str, metric: str | None = None) -> pd.DataFrame:
        """Scalars of every run in the group, with a `run` column (0..n-1)."""
        frames = [
            run.scalars(probe=probe, metric=metric).assign(run=i) for i, run in enumerate(self.runs)
        ]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def histograms(self, probe: str) -> pd.DataFrame:
        frames = [run.histograms(probe=probe).assign(run=i) for i, run in enumerate(self.runs)]
        return pd.concat(frames, ignore_index=True)

    def matrices(self, probe: str, name: str | None = None) -> pd.DataFrame:
        frames = [
            run.matrices(probe=probe, name=name).assign(run=i) for i, run in enumerate(self.runs)
        ]
        return pd.concat(frames, ignore_index=True)

    @cached_property
    def layer_rank(self) -> dict[str, int]:
        """Position of every module and parameter name in forward order, for sorting layers."""
        layers = self.runs[0].layers()
        names = [f"{m}.{p}" if p else m for m, p in zip(layers["module"], layers["param"])]
        return {name: i for i, name in enumerate(names)}

    def ordered(self, names: Any) -> list[str]:
        """`names` sorted in forward order (unknown names last, alphabetically)."""
        rank = self.layer_rank
        if isinstance(names, (pd.Series, pd.Index, np.ndarray)):
            names = pd.unique(names)  # iterating a long string column item by item is slow
        return sorted(set(names), key=lambda n: (rank.get(n, len(rank)), n))


@dataclass(frozen=True)
class FigureSpec:
    name: str
    caption: str
    draw: Callable[[RunGroup], Rendered]
    # True: curves average the group's runs; False: the figure draws one run (the first seed).
    averages: bool = True

    def describe(self, group: RunGroup) -> str:
        """The caption with what the figure stands on: how many runs, averaged or one of them."""
        if group.n == 1:
            return f"{self.caption} One run (seed {group.runs[0].info.get('seed')})."
        if self.averages:
            return f"{self.caption} Averaged over n = {group.n} runs (seeds)."
        return f"{self.caption} Drawn from one run: {group.seed_note}."


FIGURES: dict[str, FigureSpec] = {}


def figure(
    name: str, caption: str, averages: bool = True
) -> Callable[[Callable[[RunGroup], Rendered]], Callable]:
    """Register a figure: `draw(group)` returns a Figure, {suffix: Figure}, or None (no data);
    `averages` False for figures drawn from the group's first run alone."""

    def register(draw: Callable[[RunGroup], Rendered]) -> Callable[[RunGroup], Rendered]:
        FIGURES[name] = FigureSpec(name, caption, draw, averages)
        return draw

    return register


def epoch_suffix(epoch: int) -> str:
    """The name suffix of a figure drawn after `epoch` (counted from 1, as in its title): four
    digits, as every per-epoch file of a run (`epoch-NNNN.pt`), so that names sort in order."""
    return f"epoch{epoch:04d}"


def over_runs(rows: pd.DataFrame, x: str, geometric: bool = False) -> pd.DataFrame:
    """Mean, std (0 where one run) and `count` of the finite `rows["value"]` over a group's runs,
    indexed by `x`. Every x that any run reached is kept: a run that stopped earlier (its target
    accuracy met, `max_steps`, a divergence) lowers the count from there on, it does not cut the
    curve. `geometric`: of log10 of the positive values, for a log axis."""
    rows = rows[np.isfinite(rows["value"].to_numpy(float))]
    if geometric:
        rows = rows[rows["value"] > 0].assign(value=lambda d: np.log10(d["value"]))
    return rows.groupby(x)["value"].agg(["mean", "std", "count"]).fillna(0.0)


def left_out(rows: pd.DataFrame, n: int, what: str = "values ≤ 0") -> str:
    """What a log axis leaves out, to say beside it: the finite `rows` ≤ 0 (a dead network's
    gradient norms), which `over_runs(geometric=True)` drops; unsaid, a run whose values are all
    0 would leave its group's curves without a word, lowering only their n. "" when none."""
    value = rows["value"].to_numpy(float)
    out = np.isfinite(value) & (value <= 0)
    if not out.any():
        return ""
    runs = rows.loc[out, "run"].unique()
    always = not (rows["run"].isin(runs).to_numpy() & ~out).any()
    where = f"{len(runs)} of {n} runs" if n > 1 else "the run"
    where += ", at every step" if always else ""
    return f"{int(out.sum()):,} {what} ({where}) left out of the curves: a log axis cannot show 0"


def band(
    ax: Axes,
    x: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    n: int | np.ndarray,
    label: str | None = None,
    color: Any = None,
    geometric: bool = False,
    unit: str | None = None,
    **kwargs: Any,
) -> None:
    """A mean line with a ±1 std band; the legend says how many runs it averages: `n`, or the
    number of runs at each x (`n=3–4` where some runs stopped earlier or lost rows; given the
    `unit` of x, where: `n=4, 3 from step 46`). `geometric`: `mean` and `std` are of log10
    values, drawn as the geometric mean ×/÷ the geometric std (a band on a log axis that never
    dips to zero)."""
    counts = np.atleast_1d(np.asarray(n))
    low_n, n = (int(counts.min()), int(counts.max())) if counts.size else (0, 0)
    runs = f"{low_n}–{n}" if low_n != n else f"{n}"
    changes = np.flatnonzero(np.diff(counts)) + 1 if counts.size == len(x) else []
    if unit is not None and 0 < len(changes) <= 3:
        where = (f"{counts[i]} from {unit} {x[i]:.12g}" for i in changes)
        runs = ", ".join([f"{counts[0]}", *where])
    label = f"{label} (n={runs})" if label is not None and n > 1 else label
    low, high = mean - std, mean + std
    if geometric:
        mean, low, high = 10.0**mean, 10.0**low, 10.0**high
    if len(x) == 1 and kwargs.get("marker") is None:
        kwargs["marker"] = "o"  # a line through one point draws nothing: a dot for it
    (line,) = ax.plot(x, mean, label=label, color=color, **kwargs)
    if n > 1:
        ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2, lw=0)


def log_worthy(values: Any, decades: float = 2.0) -> bool:
    """True when the finite values are all positive and span more than `decades` decades: a
    linear axis would flatten all but the largest."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return bool(v.size) and bool((v > 0).all()) and v.max() > v.min() * 10**decades


def positive(values: Any) -> bool:
    """True when every finite value is > 0 (and there is one): a log axis can show them all."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return bool(v.size) and bool((v > 0).all())


def whole_numbers(nbins: int | str = "auto") -> MaxNLocator:
    """Ticks at whole numbers only (steps, epochs), also where the data sit at one x (a single
    capture): there MaxNLocator's default of two ticks falls back to fractions such as -0.045,
    which run into each other."""
    return MaxNLocator(nbins, integer=True, min_n_ticks=1)


def step_axis(ax: Axes, label: str = "optimizer step") -> None:
    """An x axis of optimizer steps or epochs: whole-number ticks only."""
    ax.set_xlabel(label)
    ax.xaxis.set_major_locator(whole_numbers())


class CompactFormatter(Formatter):
    """Tick labels that carry their own magnitude (`2e-5`, `0.03`, `1.2e4`): no offset or
    ×10ⁿ text in a corner, where it collides with neighbouring panels. Three significant digits,
    or as many more as it takes to tell the ticks apart (2.3025, 2.303, 2.3035)."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        return self.format_ticks([x])[0]

    def format_ticks(self, values: Any) -> list[str]:
        v = np.asarray(values, dtype=float)
        if v.size > 1:  # a tick at zero computed as 1e-17 reads as zero
            v = np.where(np.abs(v) < np.ptp(v) * 1e-9, 0.0, v)
        for digits in range(3, 16):
            labels = [f"{x:.{digits}g}".replace("e+0", "e").replace("e-0", "e-") for x in v]
            if len(set(labels)) == len(labels):
                break
        return labels


def compact_ticks(ax: Axes, axis: str = "both") -> None:
    """CompactFormatter's tick labels on the linear axes among `axis` ("x", "y" or "both")."""
    for name in ("x", "y") if axis == "both" else (axis,):
        target = ax.xaxis if name == "x" else ax.yaxis
        if target.get_scale() == "linear":
            target.set_major_formatter(CompactFormatter())


def mean_band(
    ax: Axes,
    rows: pd.DataFrame,
    x: str,
    n: int,
    label: str | None = None,
    color: Any = None,
    markers_upto: int = 20,
    geometric: bool = False,
) -> None:
    """`band` of `rows["value"]` averaged over runs at each `x`, with dots while there are at most
    `markers_upto` points (0: never); `geometric`: averaged as log10 values, for a log axis."""
    stats = over_runs(rows, x, geometric)
    band(
        ax,
        stats.index.to_numpy(),
        stats["mean"].to_numpy(),
        stats["std"].to_numpy(),
        stats["count"].to_numpy() if n > 1 else n,
        label=label,
        color=color,
        geometric=geometric,
        marker="o" if len(stats) <= markers_upto else None,
        markersize=3,
    )


def layer_colors(layers: list[str]) -> dict[str, Any]:
    """One line colour per layer: tab10 up to 10 layers, else evenly along viridis."""
    n = len(layers)
    cmap = matplotlib.colormaps["viridis" if n > 10 else "tab10"]
    return {layer: cmap(i / max(n - 1, 1)) if n > 10 else cmap(i) for i, layer in enumerate(layers)}


def layer_bands(
    ax: Axes,
    df: pd.DataFrame,
    colors: dict[str, Any],
    n: int,
    x: str = "x",
    labels: bool = True,
    markers_upto: int = 20,
    log: bool = False,
) -> None:
    """A `mean_band` per layer of `df` (columns `layer`, `x`, `value`, `run`), for each layer of
    `colors` in its order; layers without rows are skipped. `log`: a log y axis, with geometric
    means and bands."""
    if log:
        ax.set_yscale("log")
    parts = dict(tuple(df.groupby("layer", sort=False))) if not df.empty else {}
    for layer, color in colors.items():
        if layer in parts:
            label = short(layer) if labels else None
            mean_band(ax, parts[layer], x, n, label, color, markers_upto, geometric=log and n > 1)
    reveal_coinciding(ax)
    if not log:
        compact_ticks(ax, "y")


def reveal_coinciding(ax: Axes, dash: float = 4.0) -> None:
    """Curves of `ax` that lie on one another (two layers with equal values, often both zero)
    would show only the one drawn last while the legend lists them all: each such set is redrawn
    as interleaved dashes, one colour after the other, its dots as rings of decreasing size, and
    a note in the panel names it. Call it once the panel's curves, y scale and y limits are set,
    before its legend is made."""
    lines = [
        line
        for line in ax.get_lines()
        if line.get_linestyle() not in ("None", "", " ") and len(line.get_xdata())
    ]
    curves = [(np.asarray(c.get_xdata(), float), np.asarray(c.get_ydata(), float)) for c in lines]
    if ax.get_yscale() == "log":
        curves = [(x, np.log10(np.where(y > 0, y, np.nan))) for x, y in curves]
    finite = np.concatenate([y[np.isfinite(y)] for _, y in curves] or [np.empty(0)])
    if len(lines) < 2 or finite.size == 0:
        return
    # Apart by less than a line's width, about 1% of the panel's height: drawn as one line.
    low, high = ax.get_ylim()
    if ax.get_yscale() == "log":
        low, high = np.log10([low, high])
    tol = 0.01 * abs(high - low) or 1e-9 * max(1.0, float(np.abs(finite).max()))
    taken: set[int] = set()
    notes = []
    dashed = False  # a revealed set of lines, not only of dots
    for i in range(len(lines)):
        if i in taken:
            continue
        same = [i] + [
            j
            for j in range(i + 1, len(lines))
            if j not in taken and _lies_on(*curves[i], *curves[j], tol)
        ]
        if len(same) < 2:
            continue
        taken.update(same)
        dashed = dashed or max(len(curves[j][0]) for j in same) > 1
        period = dash * len(same)
        for k, j in enumerate(same):
            lines[j].set_linestyle(((period - k * dash) % period, (dash, period - dash)))
            # Dots on one another as rings: each drawn smaller than the one under it.
            size = lines[j].get_markersize()
            lines[j].set_markersize(size * (1 + 0.5 * (len(same) - 1 - k)))
        # The legend's names, without the run counts of a band's label.
        names = [re.sub(r" \(n=[^)]*\)$", "", lines[j].get_label()) for j in same]
        names = [name for name in names if not name.startswith("_")]
        what = " = ".join(names) if len(names) == len(same) else f"{len(same)} curves"
        notes.append(textwrap.fill(what, 36, break_on_hyphens=False))
    if notes:
        note = "\n".join(["on one another" + (" (dashes alternate):" if dashed else ":"), *notes])
        ax.add_artist(Legend(ax, [], [], title=note, loc="best", title_fontsize=6.5))


def _lies_on(xa: np.ndarray, ya: np.ndarray, xb: np.ndarray, yb: np.ndarray, tol: float) -> bool:
    """True when the shorter of curves a and b lies within `tol` of the other at each of its
    points (a run that stopped earlier hides under one that went on the same way)."""
    if len(xa) > len(xb):
        xa, ya, xb, yb = xb, yb, xa, ya
    if np.array_equal(xa, xb):  # the usual case: layers recorded at the same steps
        return bool(np.allclose(ya, yb, rtol=0, atol=tol, equal_nan=True))
    common, ia, ib = np.intersect1d(xa, xb, return_indices=True)
    if len(common) < len(xa):
        return False
    return bool(np.allclose(ya[ia], yb[ib], rtol=0, atol=tol, equal_nan=True))


def layer_figure(
    group: RunGroup, df: pd.DataFrame, nrows: int, ncols: int, size: tuple[float, float]
) -> tuple[Figure, np.ndarray, dict[str, Any]]:
    """A `new_figure` for curves of `df`'s layers, and a colour per layer in forward order."""
    colors = layer_colors(group.ordered(df["layer"]))
    fig, axes = new_figure(nrows, ncols, size=size)
    return fig, axes, colors


def stats_panel(
    ax: Axes, rows: pd.DataFrame, colors: dict[str, Any], n: int, title: str, log: bool
) -> None:
    """A panel of `layer_bands` with a small title, a grid and whole-number x ticks; a log y
    axis when `log` and every value is positive."""
    layer_bands(ax, rows, colors, n, log=log and positive(rows["value"]))
    ax.set_title(title, fontsize=9)
    ax.xaxis.set_major_locator(whole_numbers())
    ax.grid(alpha=0.3)


def layer_legend(
    fig: Figure, ax: Axes, group: RunGroup, what: str = "layer", log: bool = False
) -> None:
    """`ax`'s curves listed once, outside the panels on the right, in forward order; the title
    says how many seeds the bands average (geometrically on log axes)."""
    handles, labels = ax.get_legend_handles_labels()
    seeds = f"\nmean ± std over {group.n} seeds" if group.n > 1 else ""
    if log and group.n > 1:
        seeds += "\n(log axes: geometric mean ×/÷ std)"
    fig.legend(
        handles,
        labels,
        loc="outside right center",
        fontsize=7,
        ncol=1 if len(labels) <= 30 else 2,
        title=f"{what} (forward order){seeds}",
        title_fontsize=8,
    )


def smooth(values: np.ndarray, points: int = 200) -> np.ndarray:
    """A centred moving average that leaves about `points` independent values along the curve."""
    window = max(1, len(values) // points)
    if window == 1:
        return values
    kernel = np.ones(window) / window
    padded = np.pad(values, (window // 2, window - 1 - window // 2), mode="edge")
    return np.convolve(padded, kernel, mode="valid")


def fit_titles(fig: Figure, smallest: float = 6.0) -> None:
    """Shrinks each title that would run off the figure (a group title of many differing keys
    over a narrow figure) until it fits, down to `smallest` points. Titles are measured where
    they stand; where one comes near an edge, where its axes stand once laid out."""
    renderer, box = fig.canvas.get_renderer(), fig.bbox
    titles = [fig._suptitle, *(t for ax in fig.axes for t in (ax.title, ax._left_title))]
    titles = [t for t in titles if t is not None and t.get_text() and t.get_visible()]
    engine = fig.get_layout_engine()
    if engine is not None and any(
        t.get_window_extent(renderer).width > 0.8 * box.width for t in titles
    ):
        engine.execute(fig)
    for text in titles:
        for _ in range(3):  # width is not quite proportional to the size: measure again
            extent = text.get_window_extent(renderer)
            centre = (extent.x0 + extent.x1) / 2
            room = 2 * min(centre - box.x0, box.x1 - centre)
            size = text.get_fontsize()
            if not extent.width > room > 0 or size <= smallest:
                break
            text.set_fontsize(max(smallest, size * 0.97 * room / extent.width))


def new_figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (6.4, 4.2), **kw: Any):
    """A figure of `nrows × ncols` panels each about `size` inches, laid out without overlaps."""
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False, **kw
    )
    fig.set_layout_engine("constrained")
    return fig, axes


def panel_grid(
    nrows: int,
    ncols: int,
    panel: tuple[float, float],
    gap: tuple[float, float],
    margins: tuple[float, float, float, float],
):
    """A figure of `nrows × ncols` panels laid out at fixed sizes in inches: each `panel` (w, h),
    `gap` (w, h) between panels, `margins` (left, right, top, bottom) around them. For grids of
    dozens of panels, where constrained layout costs more than the drawing; the caller leaves
    room in `gap` and `margins` for its titles, tick labels, legends and colour bar."""
    left, right, top, bottom = margins
    width = left + right + ncols * panel[0] + (ncols - 1) * gap[0]
    height = top + bottom + nrows * panel[1] + (nrows - 1) * gap[1]
    spacing = {
        "left": left / width,
        "right": 1 - right / width,
        "top": 1 - top / height,
        "bottom": bottom / height,
        "wspace": gap[0] / panel[0],
        "hspace": gap[1] / panel[1],
    }
    return plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False, gridspec_kw=spacing)


def short(name: str, width: int = 28) -> str:
    """A layer name short enough for a tick label."""
    return name if len(name) <= width else "…" + name[-(width - 1) :]
