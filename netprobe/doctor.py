"""`netprobe doctor`: verdicts with their evidence, from the stored tables alone (SPEC §1).

Each rule is one small function that reads a run through the Run API and returns findings: a
stable code, a severity (`info`, `warning`, `error`), the layers and the step/epoch range
concerned, the numbers that triggered it together with the threshold, and one line of advice.
A rule whose inputs were not recorded returns an `info` finding naming the probe to turn on.
The rules and where their thresholds come from are written down in the README ("Doctor").
"""

from __future__ import annotations

import html
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from netprobe.errors import ConfigError
from netprobe.store import Run, load, update_info

SEVERITIES = ("info", "warning", "error")
# Every probe whose scalars some rule reads.
PROBES_READ = (
    "train",
    "gradients",
    "gradient_flow",
    "activations",
    "optim_dynamics",
    "rwc",
    "weights",
)
# Every metric some rule reads (the tables hold many more).
METRICS_READ = (
    "loss",
    "grad_l2_total",
    "val_loss",
    "val_acc",
    "l1",
    "l2",
    "nonfinite",
    "w_grad_l2",
    "train/dead_frac",
    "zero_frac_1e7",
    "flip_frac_all",
    "rwc",
    "std",
    "mean",
    "dist_init",
)
_EMPTY = pd.DataFrame({"step": [], "epoch": [], "layer": [], "value": []})
# Modules after which an output that is ≤ 0 for every sample is a unit that never fires.
RECTIFIERS = {"ReLU", "ReLU6", "RReLU", "Threshold"}


@dataclass(frozen=True)
class Thresholds:
    """The doctor's thresholds (config group `doctor`, flags of `netprobe doctor`)."""

    vanishing_ratio: float = 1e-3  # a layer's RMS gradient ≤ this × the model's median layer
    exploding_ratio: float = 1e3  # … ≥ this × the median layer
    exploding_growth: float = 1e3  # model-wide gradient norm, peak ÷ median of the first tenth
    dead_frac: float = 0.75  # share of units ≤ 0 on every train-probe sample, before a ReLU
    zero_grad_frac: float = 0.9  # share of a layer's gradient entries with |g| ≤ 1e-7
    stall_ratio: float = 0.01  # a layer's weight change ≤ this × the model's median layer
    symmetric_cv: float = 1e-4  # weight std ≤ this × |mean| (or exactly 0) at the first capture
    plateau_improvement: float = 0.01  # last quarter of steps improves on the one before by less
    plateau_loss_frac: float = 0.5  # … while the loss is still ≥ this × its start
    overfit_epochs: int = 3  # epochs in a row of a growing val−train loss gap and rising val loss
    spike_factor: float = 3.0  # a step's loss ≥ this × the median of the `spike_window` before
    spike_window: int = 20
    spike_frac: float = 0.02  # share of steps that spike
    chance_margin: float = 1.5  # best val acc ≤ this × 1/num_classes
    divergence_growth: float = 10.0  # finite loss, last tenth ÷ first tenth of steps


def thresholds(
    values: Mapping[str, Any] | None = None, base: Thresholds | None = None
) -> Thresholds:
    """`base` (the defaults) with `values` applied; refuses unknown keys and bad values."""
    base = base or Thresholds()
    kinds = {f.name: f.type for f in fields(Thresholds)}
    changes = {}
    for key, value in (values or {}).items():
        if key not in kinds:
            raise ConfigError(f"unknown doctor key {key!r}; valid keys: {', '.join(kinds)}")
        want_int = kinds[key] in (int, "int")
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = (
            ok
            and math.isfinite(value)
            and value > 0
            and (not want_int or float(value).is_integer())
        )
        if not ok:
            kind = "a positive integer" if want_int else "a positive number"
            raise ConfigError(f"doctor.{key}={value!r} is not valid; expected {kind}")
        changes[key] = int(value) if want_int else float(value)
    return replace(base, **changes)


@dataclass
class Finding:
    """One verdict about one run."""

    code: str
    severity: str
    message: str
    layers: list[str] = field(default_factory=list)
    steps: tuple[int, int] | None = None
    epochs: tuple[int, int] | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    advice: str = ""
    figure: str | None = None  # the figure family that shows the evidence

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["steps"] = list(self.steps) if self.steps else None
        out["epochs"] = list(self.epochs) if self.epochs else None
        return out


class _Tables:
    """What the rules read, each (probe, metric) fetched once and shared between rules."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.config = run.config or {}
        self._groups: dict[tuple[str, str], dict[str, np.ndarray]] | None = None
        self._frames: dict[tuple[str, str], pd.DataFrame] = {}
        self._layers: pd.DataFrame | None = None
        self._names: dict[str, tuple[int, int]] | None = None

    def arrays(self, probe: str, metric: str) -> dict[str, np.ndarray] | None:
        """One stored metric as numpy columns (step, epoch, layer, value), or None."""
        if self._groups is None:
            self._groups = self.run.scalar_groups(PROBES_READ, METRICS_READ)
        return self._groups.get((probe, metric))

    def metric(self, probe: str, metric: str) -> pd.DataFrame:
        key = (probe, metric)
        if key not in self._frames:
            columns = self.arrays(probe, metric)
            self._frames[key] = _EMPTY if columns is None else pd.DataFrame(columns)
        return self._frames[key]

    def has(self, probe: str, metric: str) -> bool:
        return self.arrays(probe, metric) is not None

    def curve(self, metric: str) -> pd.DataFrame:
        """A model-wide training curve (probe `train`), ordered by step."""
        return self.metric("train", metric).sort_values("step", kind="stable")

    def per_layer(self, probe: str, metric: str) -> pd.DataFrame:
        """step × layer values of one metric (the last at each step), layers in forward order."""
        columns = self.arrays(probe, metric)
        if columns is None:
            return pd.DataFrame()
        named = columns["layer"] != ""
        steps, at = np.unique(columns["step"][named], return_inverse=True)
        names, of = np.unique(columns["layer"][named].astype(str), return_inverse=True)
        grid = np.full((len(steps), len(names)), np.nan)
        grid[at, of] = columns["value"][named]
        ordered = sorted(range(len(names)), key=lambda i: self.order(names[i]))
        return pd.DataFrame(grid[:, ordered], index=steps, columns=names[ordered])

    @property
    def layers(self) -> pd.DataFrame:
        if self._layers is None:
            self._layers = self.run.layers()
        return self._layers

    def _index(self) -> dict[str, tuple[int, int]]:
        """name → (forward order, numel) for every module and parameter in layers.parquet."""
        if self._names is None:
            layers = self.layers
            names = np.where(
                layers["param"] == "", layers["module"], layers["module"] + "." + layers["param"]
            )
            self._names = dict(zip(names, zip(layers["order"].tolist(), layers["numel"].tolist())))
        return self._names

    def order(self, name: str) -> tuple[int, str]:
        return (self._index().get(name, (1 << 30, 0))[0], name)

    def numel(self, name: str) -> int:
        return self._index().get(name, (0, 0))[1]

    def num_classes(self) -> int | None:
        for group in ("data", "model"):
            value = (self.config.get(group) or {}).get("num_classes")
            if isinstance(value, int) and value > 1:
                return value
        return None


def _missing(code: str, probes: str, what: str) -> Finding:
    return Finding(
        code,
        "info",
        f"not checked: {what} was not recorded",
        evidence={"missing": probes},
        advice=f"turn on probes=[{probes}] to check {code}",
    )


def _window(n: int, frac: float = 0.1) -> int:
    return max(1, int(round(n * frac)))


def _r(x: float) -> float:
    """A float for evidence: four significant digits, JSON-safe (non-finite as None)."""
    x = float(x)
    return float(f"{x:.4g}") if math.isfinite(x) else x


def _span(steps: Iterable[int]) -> tuple[int, int] | None:
    steps = [int(s) for s in steps]
    return (min(steps), max(steps)) if steps else None


def _epochs_of(data: pd.DataFrame, steps: tuple[int, int] | None) -> tuple[int, int] | None:
    if steps is None or data.empty:
        return None
    inside = data[(data["step"] >= steps[0]) & (data["step"] <= steps[1])]["epoch"]
    return (int(inside.min()), int(inside.max())) if len(inside) else None


# ---------------------------------------------------------------- rules


def diverged(t: _Tables, th: Thresholds) -> list[Finding]:
    """Error: a non-finite training loss (first step; the layers whose gradients went non-finite
    first, from `gradients/nonfinite`), or a finite loss that grew `divergence_growth`-fold."""
    loss = t.curve("loss")
    if loss.empty:
        return []
    values = loss["value"].to_numpy()
    bad = ~np.isfinite(values)
    first_bad = (
        loss["step"].to_numpy()[bad].min() if bad.any() else t.run.info.get("first_nonfinite_step")
    )
    if first_bad is None:
        finite = values[np.isfinite(values)]
        w = _window(len(finite))
        if len(finite) < 10:
            return []
        start, end = np.median(finite[:w]), np.median(finite[-w:])
        if end < th.divergence_growth * start:
            return []
        steps = (int(loss["step"].iloc[0]), int(loss["step"].iloc[-1]))
        return [
            Finding(
                "diverged",
                "error",
                f"the training loss grew {end / start:.3g}-fold without becoming non-finite",
                steps=steps,
                epochs=_epochs_of(loss, steps),
                evidence={
                    "loss_start": _r(start),
                    "loss_end": _r(end),
                    "growth": _r(end / start),
                    "threshold": th.divergence_growth,
                },
                advice="lower the learning rate, or clip gradients",
                figure="training_curves",
            )
        ]
    first_bad = int(first_bad)
    before = loss[(loss["step"] < first_bad) & np.isfinite(loss["value"])].tail(5)
    norms = t.curve("grad_l2_total")
    norms = norms[norms["step"] < first_bad].tail(5)
    evidence: dict[str, Any] = {
        "first_nonfinite_step": first_bad,
        "loss_before": [_r(v) for v in before["value"]],
        "grad_norm_before": [_r(v) for v in norms["value"]],
        "threshold": "non-finite loss",
    }
    layers: list[str] = []
    if t.has("gradients", "nonfinite"):
        counts = t.metric("gradients", "nonfinite")
        counts = counts[(counts["value"] > 0) & (counts["layer"] != "")]
        if len(counts):
            step = int(counts["step"].min())
            layers = sorted(counts[counts["step"] == step]["layer"], key=t.order)
            evidence["first_nonfinite_grad_step"] = step
    else:
        evidence["first_nonfinite_layer"] = "not recorded: turn on probes=[gradients]"
    return [
        Finding(
            "diverged",
            "error",
            f"the training loss became non-finite at step {first_bad}",
            layers=layers,
            steps=(first_bad, first_bad),
            epochs=_epochs_of(loss, (first_bad, first_bad)),
            evidence=evidence,
            advice="lower the learning rate, clip gradients, or check the input normalization",
            figure="training_curves",
        )
    ]


def gradient_scale(t: _Tables, th: Thresholds) -> list[Finding]:
    """Warnings: a layer whose RMS gradient (‖g‖₂/√numel, median over steps) is ≤
    `vanishing_ratio` or ≥ `exploding_ratio` × the median layer's (exploding only when none
    vanishes); the model-wide gradient norm peaking at `exploding_growth` × its median over the
    first tenth of steps, or ending that much below it while the loss stays above
    `plateau_loss_frac` of its start."""
    found: list[Finding] = []
    total = t.curve("grad_l2_total")
    total = total[np.isfinite(total["value"])]
    if len(total) >= 20:
        values = total["value"].to_numpy()
        w = _window(len(values))
        start, end, peak = np.median(values[:w]), np.median(values[-w:]), values[w:].max()
        loss = t.curve("loss")["value"].to_numpy()
        loss = loss[np.isfinite(loss)]
        stuck = len(loss) >= 20 and np.median(loss[-w:]) >= th.plateau_loss_frac * np.median(
            loss[:w]
        )
        growth = peak / start if start > 0 else math.inf
        shrink = end / start if start > 0 else math.inf
        evidence = {
            "grad_norm_start": _r(start),
            "grad_norm_peak": _r(peak),
            "grad_norm_end": _r(end),
        }
        if growth >= th.exploding_growth:
            steps = _span(total["step"].to_numpy()[w:][values[w:] >= th.exploding_growth * start])
            found.append(
                Finding(
                    "exploding_gradients",
                    "warning",
                    f"the gradient norm grew {growth:.3g}-fold over training",
                    steps=steps,
                    epochs=_epochs_of(total, steps),
                    evidence={**evidence, "growth": _r(growth), "threshold": th.exploding_growth},
                    advice="lower the learning rate, clip gradients, or add normalization layers",
                    figure="training_curves",
                )
            )
        elif stuck and shrink <= 1 / th.exploding_growth:
            steps = (int(total["step"].iloc[0]), int(total["step"].iloc[-1]))
            found.append(
                Finding(
                    "vanishing_gradients",
                    "warning",
                    f"the gradient norm shrank {1 / shrink:.3g}-fold while the loss stayed high",
                    steps=steps,
                    epochs=_epochs_of(total, steps),
                    evidence={
                        **evidence,
                        "shrink": _r(shrink),
                        "threshold": 1 / th.exploding_growth,
                    },
                    advice="use ReLU-like activations, normalization layers or a "
                    "variance-preserving init",
                    figure="training_curves",
                )
            )
    probe, metric = (
        ("gradients", "l2") if t.has("gradients", "l2") else ("gradient_flow", "w_grad_l2")
    )
    if not t.has(probe, metric):
        return [*found, _missing("vanishing_gradients", "gradients", "per-layer gradient norms")]
    wide = t.per_layer(probe, metric)
    wide = wide.where(np.isfinite(wide))
    sizes = np.array([max(t.numel(n), 1) for n in wide.columns], float)
    rms = np.nanmedian(wide.to_numpy() / np.sqrt(sizes), axis=0)
    keep = np.isfinite(rms)
    if keep.sum() < 3:
        return found
    names = list(np.array(wide.columns)[keep])
    rms = rms[keep]
    median = float(np.median(rms))
    if median <= 0:
        return found
    ratio = rms / median
    steps = _span(wide.index[[0, -1]])
    vanishing = ratio <= th.vanishing_ratio
    # Beside vanishing layers every other layer is far above the median: that is the same
    # problem seen from the other side, so a layer counts as exploding only when none vanish.
    exploding = (ratio >= th.exploding_ratio) & ~vanishing.any()
    for code, hit, limit, advice in (
        (
            "vanishing_gradients",
            vanishing,
            th.vanishing_ratio,
            "use ReLU-like activations, residual connections, normalization, or a "
            "variance-preserving init (kaiming/xavier)",
        ),
        (
            "exploding_gradients",
            exploding,
            th.exploding_ratio,
            "lower the learning rate, clip gradients, or use a variance-preserving init",
        ),
    ):
        if hit.any():
            layers = [n for n, h in zip(names, hit) if h]
            found.append(
                Finding(
                    code,
                    "warning",
                    f"{len(layers)} layer(s) with gradients "
                    f"{'below' if code[0] == 'v' else 'above'} "
                    f"{limit:g} × the model's median layer",
                    layers=layers,
                    steps=steps,
                    epochs=_epochs_of(t.metric(probe, metric), steps),
                    evidence={
                        "rms_grad": {n: _r(v) for n, v, h in zip(names, rms, hit) if h},
                        "ratio_to_median": {n: _r(v) for n, v, h in zip(names, ratio, hit) if h},
                        "model_median_rms_grad": _r(median),
                        "threshold": limit,
                    },
                    advice=advice,
                    figure="grad_flow_bars" if probe == "gradients" else "gradient_flow_graph",
                )
            )
    return found


def _rectified(t: _Tables) -> set[str]:
    """Modules whose output goes straight into a rectifier (by the data-flow graph, else by the
    forward order): below zero on every sample there means the unit never fires."""
    layers = t.layers
    modules = layers[layers["param"] == ""]
    kind = dict(zip(modules["module"], modules["type"]))
    graph = t.run.graph()
    if len(graph):
        edges = zip(graph["source"], graph["target"])
    else:
        ordered = modules.sort_values("order")["module"].tolist()
        edges = zip(ordered[:-1], ordered[1:])
    return {s for s, d in edges if kind.get(d) in RECTIFIERS and kind.get(s) not in RECTIFIERS}


def dead_units(t: _Tables, th: Thresholds) -> list[Finding]:
    """Warning: at the last capture, a module feeding a ReLU has `dead_frac` (units ≤ 0 on every
    sample of the fixed train batch) ≥ `dead_frac`."""
    if not t.has("activations", "train/dead_frac"):
        return [_missing("dead_units", "activations", "activations' dead_frac on train inputs")]
    wide = t.per_layer("activations", "train/dead_frac")
    rectified = _rectified(t)
    wide = wide[[c for c in wide.columns if c in rectified]]
    if wide.empty:
        return []
    last = wide.iloc[-1]
    hit = last[last >= th.dead_frac]
    if hit.empty:
        return []
    over = wide[hit.index].ge(th.dead_frac).any(axis=1)
    steps = _span(wide.index[over.to_numpy()])
    return [
        Finding(
            "dead_units",
            "warning",
            f"{len(hit)} layer(s) with ≥ {th.dead_frac:.0%} of units that never fire",
            layers=list(hit.index),
            steps=steps,
            epochs=_epochs_of(t.metric("activations", "train/dead_frac"), steps),
            evidence={
                "dead_frac": {n: _r(v) for n, v in hit.items()},
                "threshold": th.dead_frac,
            },
            advice="lower the learning rate, use LeakyReLU/GELU, or an init that keeps "
            "pre-activations centred",
            figure="activation_stats",
        )
    ]


def zero_gradients(t: _Tables, th: Thresholds) -> list[Finding]:
    """Warning: a layer whose gradient is exactly zero as a whole on ≥ 90 % of steps
    (`gradients` l1), or whose share of entries with |g| ≤ 1e-7 (`optim_dynamics`
    zero_frac_1e7, median over the second half of steps) is ≥ `zero_grad_frac`."""
    if t.has("optim_dynamics", "zero_frac_1e7"):
        wide = t.per_layer("optim_dynamics", "zero_frac_1e7")
        late = wide.iloc[len(wide) // 2 :]
        value = late.median()
        metric, limit = "zero_frac_1e7", th.zero_grad_frac
        figure = "optim_dynamics_curves"
    elif t.has("gradients", "l1"):
        wide = t.per_layer("gradients", "l1")
        late = wide
        value = (wide == 0).mean()
        metric, limit = "steps_with_all_zero_gradient", 0.9
        figure = "grad_flow_bars"
    else:
        return [_missing("zero_gradients", "gradients", "per-layer gradients")]
    hit = value[value >= limit]
    if hit.empty:
        return []
    steps = _span(late.index[[0, -1]])
    return [
        Finding(
            "zero_gradients",
            "warning",
            f"{len(hit)} layer(s) whose gradients are almost all exactly zero",
            layers=list(hit.index),
            steps=steps,
            evidence={metric: {n: _r(v) for n, v in hit.items()}, "threshold": limit},
            advice="look for dead ReLUs, a detached or unused branch, or saturated activations",
            figure=figure,
        )
    ]


def stalled_layer(t: _Tables, th: Thresholds) -> list[Finding]:
    """Warning: a layer whose weight change (median `rwc` over epochs, else the last `dist_init`)
    is ≤ `stall_ratio` × the model's median layer while that median is above zero."""
    if t.has("rwc", "rwc"):
        wide = t.per_layer("rwc", "rwc")
        change = wide.median()
        metric, figure = "rwc", "rwc_heatmap"
    elif t.has("weights", "dist_init"):
        wide = t.per_layer("weights", "dist_init")
        change = wide.iloc[-1]
        metric, figure = "dist_init", "weights_stats"
    else:
        return [_missing("stalled_layer", "rwc", "relative weight change (rwc or weights)")]
    change = change[np.isfinite(change)]
    if len(change) < 2:
        return []
    median = float(change.median())
    if median <= 0:
        return []
    hit = change[change <= th.stall_ratio * median]
    if hit.empty:
        return []
    steps = _span(wide.index[[0, -1]])
    return [
        Finding(
            "stalled_layer",
            "warning",
            f"{len(hit)} layer(s) whose weights barely move while the others learn",
            layers=list(hit.index),
            steps=steps,
            epochs=_epochs_of(
                t.metric(*(("rwc", "rwc") if metric == "rwc" else ("weights", metric))), steps
            ),
            evidence={
                metric: {n: _r(v) for n, v in hit.items()},
                "model_median": _r(median),
                "threshold": th.stall_ratio,
            },
            advice="check that the layer is trainable and in the optimizer, and its learning rate",
            figure=figure,
        )
    ]


def _weight_names(t: _Tables) -> set[str]:
    """The conv and linear weights, the tensors an initializer sets."""
    layers = t.layers
    weights = layers[(layers["param"] == "weight") & layers["type"].str.match(r"(Linear|Conv)")]
    return set(weights["module"] + ".weight")


def symmetric_init(t: _Tables, th: Thresholds) -> list[Finding]:
    """Error: at the first capture a weight's std is 0 or ≤ `symmetric_cv` × |mean| (every unit
    the same: gradients cannot tell them apart). Without the weights probe, the run's own
    config saying init=ones or zeros is the evidence."""
    advice = "use a random initializer (init=kaiming_normal, xavier_uniform or default)"
    if not t.has("weights", "std"):
        init = t.config.get("init", {}) or {}
        name = init.get("name") if isinstance(init, dict) else None
        if name not in ("ones", "zeros"):
            return [_missing("symmetric_init", "weights", "weight std per layer")]
        return [
            Finding(
                "symmetric_init",
                "error",
                f"init={name} gives every unit of a layer the same weights",
                layers=sorted(_weight_names(t), key=t.order),
                evidence={"init": name, "threshold": "constant initializer"},
                advice=advice,
            )
        ]
    # Conv and linear weights only: zero biases and unit norm-layer scales are meant to be equal.
    weights = _weight_names(t)
    std = t.per_layer("weights", "std")
    std = std[[c for c in std.columns if c in weights]]
    if std.empty:
        return []
    mean = t.per_layer("weights", "mean")
    first_std, first_mean = std.iloc[0], mean.iloc[0].reindex(std.columns)
    hit = (first_std == 0) | (first_std <= th.symmetric_cv * first_mean.abs())
    if not hit.any():
        return []
    step = int(std.index[0])
    return [
        Finding(
            "symmetric_init",
            "error",
            f"{int(hit.sum())} layer(s) start with identical weights in every unit",
            layers=list(first_std.index[hit]),
            steps=(step, step),
            evidence={
                "std": {n: _r(v) for n, v in first_std[hit].items()},
                "mean": {n: _r(v) for n, v in first_mean[hit].items()},
                "threshold": th.symmetric_cv,
            },
            advice=advice,
            figure="weights_stats",
        )
    ]


def loss_plateau(t: _Tables, th: Thresholds) -> list[Finding]:
    """Warning: the median loss over the last quarter of steps improves on the quarter before by
    less than `plateau_improvement`, while still ≥ `plateau_loss_frac` × its first tenth, and the
    last epoch's validation loss (when recorded) improves on the epoch before by less than that
    too: a run whose validation loss still falls is learning, however slowly its loss moves."""
    val = t.curve("val_loss")["value"].to_numpy()
    val = val[np.isfinite(val)]
    if len(val) >= 2 and val[-2] > 0 and 1 - val[-1] / val[-2] >= th.plateau_improvement:
        return []
    loss = t.curve("loss")
    loss = loss[np.isfinite(loss["value"])]
    n = len(loss)
    if n < 20:
        return []
    values = loss["value"].to_numpy()
    q = n // 4
    start = np.median(values[: _window(n)])
    before, last = np.median(values[-2 * q : -q]), np.median(values[-q:])
    improvement = 1 - last / before if before > 0 else 0.0
    if improvement >= th.plateau_improvement or last < th.plateau_loss_frac * start:
        return []
    steps = (int(loss["step"].iloc[-2 * q]), int(loss["step"].iloc[-1]))
    return [
        Finding(
            "loss_plateau",
            "warning",
            f"the loss stopped improving at {last / start:.0%} of where it started",
            steps=steps,
            epochs=_epochs_of(loss, steps),
            evidence={
                "loss_start": _r(start),
                "loss_previous_quarter": _r(before),
                "loss_last_quarter": _r(last),
                "improvement": _r(improvement),
                "threshold": th.plateau_improvement,
            },
            advice="raise the learning rate or change the optimizer/schedule; check the data "
            "and labels",
            figure="training_curves",
        )
    ]


def overfitting(t: _Tables, th: Thresholds) -> list[Finding]:
    """Warning: for `overfit_epochs` epochs in a row the gap between validation loss and the
    epoch's mean training loss grew and the validation loss rose."""
    val = t.curve("val_loss")
    if val.empty:
        return []
    val = val.groupby("epoch")["value"].last()
    train = t.curve("loss").groupby("epoch")["value"].mean().reindex(val.index)
    gap = val - train
    rising = ((gap.diff() > 0) & (val.diff() > 0)).to_numpy()
    best, end, length = 0, -1, 0
    for i, up in enumerate(rising):
        length = length + 1 if up else 0
        if length >= best and length > 0:
            best, end = length, i
    if best < th.overfit_epochs:
        return []
    epochs = (int(val.index[end - best]), int(val.index[end]))
    window = slice(end - best, end + 1)
    return [
        Finding(
            "overfitting",
            "warning",
            f"validation loss rose and the train–validation gap grew for {best} epochs",
            epochs=epochs,
            evidence={
                "val_loss": [_r(v) for v in val.iloc[window]],
                "gap": [_r(v) for v in gap.iloc[window]],
                "epochs_rising": best,
                "threshold": th.overfit_epochs,
            },
            advice="stop earlier (trainer.target_val_acc), add data, augmentation or weight decay",
            figure="training_curves",
        )
    ]


def unstable_loss(t: _Tables, th: Thresholds) -> list[Finding]:
    """Warning: ≥ `spike_frac` of steps whose loss is ≥ `spike_factor` × the median of the
    `spike_window` steps before and above it by ≥ a tenth of the starting loss."""
    loss = t.curve("loss")
    loss = loss[np.isfinite(loss["value"])]
    w = th.spike_window
    if len(loss) <= 2 * w:
        return []
    values = pd.Series(loss["value"].to_numpy())
    ref = values.rolling(w).median().shift(1)
    start = float(np.median(values[:w]))
    spike = (values >= th.spike_factor * ref) & (values - ref >= 0.1 * start)
    share = float(spike[w:].mean())
    if share < th.spike_frac:
        return []
    steps_at = loss["step"].to_numpy()[spike.to_numpy()]
    evidence: dict[str, Any] = {
        "spikes": int(spike.sum()),
        "spike_share": _r(share),
        "worst_ratio": _r((values / ref)[spike].max()),
        "threshold": th.spike_frac,
    }
    if t.has("optim_dynamics", "flip_frac_all"):
        evidence["flip_frac_all_median"] = _r(
            t.metric("optim_dynamics", "flip_frac_all")["value"].median()
        )
    steps = _span(steps_at)
    return [
        Finding(
            "unstable_loss",
            "warning",
            f"{int(spike.sum())} loss spikes ({share:.1%} of steps)",
            steps=steps,
            epochs=_epochs_of(loss, steps),
            evidence=evidence,
            advice="lower the learning rate, use warm-up, or clip gradients",
            figure="training_curves",
        )
    ]


def no_learning(t: _Tables, th: Thresholds) -> list[Finding]:
    """Error: the best validation accuracy is ≤ `chance_margin` × 1/num_classes and the
    validation loss is not falling (its last value ≥ 0.99 × its first; one epoch: accuracy
    alone). A slow start whose validation loss still falls is not reported."""
    val = t.curve("val_acc")
    classes = t.num_classes()
    if val.empty or classes is None:
        return []
    best = float(val["value"].max())
    chance = 1 / classes
    if not best <= th.chance_margin * chance:
        return []
    val_loss = t.curve("val_loss")["value"].to_numpy()
    evidence: dict[str, Any] = {}
    if len(val_loss) >= 2:
        first, last = val_loss[0], val_loss[-1]
        if math.isfinite(last) and last < 0.99 * first:
            return []
        evidence = {"val_loss_first": _r(first), "val_loss_last": _r(last)}
    return [
        Finding(
            "no_learning",
            "error",
            f"validation accuracy never left chance level ({best:.1%}, chance {chance:.1%})",
            epochs=(int(val["epoch"].min()), int(val["epoch"].max())),
            evidence={
                "best_val_acc": _r(best),
                "chance": _r(chance),
                "num_classes": classes,
                **evidence,
                "threshold": _r(th.chance_margin * chance),
            },
            advice="check labels and inputs, then the learning rate and initializer",
            figure="training_curves",
        )
    ]


RULES: tuple[Callable[[_Tables, Thresholds], list[Finding]], ...] = (
    diverged,
    no_learning,
    symmetric_init,
    gradient_scale,
    dead_units,
    zero_gradients,
    stalled_layer,
    loss_plateau,
    overfitting,
    unstable_loss,
)
CODES = (
    "diverged",
    "no_learning",
    "symmetric_init",
    "exploding_gradients",
    "vanishing_gradients",
    "dead_units",
    "zero_gradients",
    "stalled_layer",
    "loss_plateau",
    "overfitting",
    "unstable_loss",
)


def diagnose(
    run: Run | str | os.PathLike,
    th: Thresholds | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> list[Finding]:
    """Every finding about one stored run, worst first. Thresholds: `th`, else the run's own
    `doctor` config (the defaults where it has none) with `overrides` on top."""
    tables = _Tables(run if isinstance(run, Run) else load(run))
    if th is None:
        th = thresholds(overrides, thresholds(tables.config.get("doctor")))
    found = [f for rule in RULES for f in rule(tables, th)]
    return sorted(found, key=lambda f: -SEVERITIES.index(f.severity))


def problems(found: Iterable[Finding]) -> list[Finding]:
    """The warnings and errors."""
    return [f for f in found if f.severity != "info"]


def counts(found: Iterable[Finding]) -> str:
    """`2 errors, 1 warning`, or `ok`."""
    n = {s: 0 for s in SEVERITIES}
    for f in found:
        n[f.severity] += 1
    parts = [f"{n[s]} {s}{'s' if n[s] != 1 else ''}" for s in ("error", "warning") if n[s]]
    return ", ".join(parts) or "ok"


def health(run: Run | str | os.PathLike) -> str:
    """The `health` cell of `netprobe ls`: the findings run.json keeps for a finished run, else
    a fresh diagnosis."""
    run = run if isinstance(run, Run) else load(run)
    kept = run.info.get("findings")
    if isinstance(kept, list) and run.status != "running":
        return counts(Finding(**{k: v for k, v in f.items() if k in _FIELDS}) for f in kept)
    return counts(problems(diagnose(run)))


_FIELDS = {f.name for f in fields(Finding)}


def close_run(run_dir: str | os.PathLike) -> str:
    """After training: keep the run's warnings and errors in run.json `findings` and return
    the lines for the closing summary (empty when there are none)."""
    try:
        found = problems(diagnose(run_dir))
        update_info(run_dir, findings=[f.to_dict() for f in found])
    except Exception as exc:  # noqa: BLE001 - a diagnosis must never cost the run its summary
        return f"doctor: not run ({type(exc).__name__}: {exc})\n"
    if not found:
        return ""
    lines = [f"doctor: {counts(found)} (netprobe doctor {run_dir} for the evidence)"]
    lines += [f"  {f.severity:<7} {f.code:<19} {f.message}{_where(f)}" for f in found]
    return "\n".join(lines) + "\n"


def _where(f: Finding) -> str:
    layers = ", ".join(f.layers[:3]) + (f" +{len(f.layers) - 3}" if len(f.layers) > 3 else "")
    return f" [{layers}]" if layers else ""


def findings_html(items: Iterable[tuple[Run, Mapping[str, str]]]) -> str:
    """The report page's opening section: each run's warnings and errors, each linked to the
    figure showing its evidence (`links`: figure file stem → href)."""
    merged: dict[Path, tuple[Run, dict[str, str]]] = {}
    for run, links in items:  # a run in several sections: every figure it appears in
        merged.setdefault(run.path, (run, {}))[1].update(links)
    rows = []
    for run, links in merged.values():
        for f in problems(diagnose(run)):
            href = _figure_href(f.figure, links)
            code = html.escape(f.code)
            code = f"<a href='{html.escape(href)}'>{code}</a>" if href else code
            evidence = html.escape(", ".join(f"{k}={v}" for k, v in f.evidence.items()))
            rows.append(
                f"<tr class='{f.severity}'><td>{html.escape(str(run.path))}</td>"
                f"<td>{f.severity}</td>"
                f"<td>{code}</td><td>{html.escape(f.message)}{html.escape(_where(f))}"
                f"<br><small>{evidence}</small></td><td>{html.escape(f.advice)}</td></tr>"
            )
    if not rows:
        return "<p id='findings'>netprobe doctor: no warnings or errors.</p>"
    return (
        "<style>#findings .error td:nth-child(2){color:#b3261e}"
        "#findings .warning td:nth-child(2){color:#a05a00}</style><table id='findings'>"
        "<tr><th>run</th><th>severity</th><th>code</th><th>what</th><th>what helps</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def _figure_href(figure: str | None, links: Mapping[str, str]) -> str | None:
    if figure is None:
        return None
    for stem, href in links.items():
        if stem == figure or stem.startswith(f"{figure}_"):
            return href
    return None


# ---------------------------------------------------------------- the command


def report(
    paths: Iterable[str | os.PathLike], overrides: Mapping[str, Any], fmt: str = "table"
) -> int:
    """`netprobe doctor`: diagnose every run under `paths`, print a table per sweep (or JSON);
    returns the number of warnings and errors."""
    from netprobe.listing import runs_by_sweep  # listing shows health(): import late

    thresholds(overrides)  # refuse a bad flag before reading anything
    order = [
        (sweep, run_dir, members[run_dir])
        for sweep, members in runs_by_sweep(paths).items()
        for run_dir in sorted(members, key=lambda d: (members[d], str(d)))
    ]
    dirs = [d for _, d, _ in order]
    workers = min(os.cpu_count() or 1, len(dirs) // 50)  # a pool pays off from ~100 runs on
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            done = list(pool.map(_examine, dirs, [overrides] * len(dirs), chunksize=25))
    else:
        done = [_examine(d, overrides) for d in dirs]
    results = [(s, d, w, status, found) for (s, d, w), (status, found) in zip(order, done)]
    if fmt == "json":
        out = [
            {
                "run": str(d),
                "sweep": str(s) if s else None,
                "swept": w,
                "status": st,
                "health": counts(problems(f)),
                "findings": [x.to_dict() for x in f],
            }
            for s, d, w, st, f in results
        ]
        json.dump(out, sys.stdout, indent=2, default=str)
        print()
    else:
        _print_tables(results)
    return sum(len(problems(f)) for *_, f in results)


def _examine(run_dir: Path, overrides: Mapping[str, Any]) -> tuple[str, list[Finding]]:
    """One run's status and findings; a run whose run.json cannot be read is one error."""
    try:
        run = load(run_dir)
        return run.status, diagnose(run, overrides=overrides)
    except (OSError, ValueError) as exc:
        return "damaged", [Finding("damaged", "error", f"run.json cannot be read: {exc}")]


_STYLE = {"error": "bold red", "warning": "yellow", "info": "dim"}


def _print_tables(results: list[tuple[Path | None, Path, str, str, list[Finding]]]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)
    groups: dict[Path | None, list] = {}
    for item in results:
        groups.setdefault(item[0], []).append(item)
    for sweep, items in groups.items():
        title = f"sweep {sweep} ({len(items)} runs)" if sweep else "runs"
        table = Table(title=title, title_justify="left", show_lines=True)
        if sweep:
            table.add_column("swept", overflow="fold")
        for col in ("run", "severity", "code", "where", "evidence", "what helps"):
            table.add_column(col, overflow="fold", no_wrap=col in ("severity", "code"))
        for _, run_dir, swept, status, found in items:
            shown = str(run_dir.resolve().relative_to(sweep)) if sweep else str(run_dir)
            lead = [swept] if sweep else []
            rows = [
                (f.severity, f.code, _place(f), _evidence(f), f.advice, f.message)
                for f in problems(found)
            ]
            unchecked = [f for f in found if f.severity == "info"]
            if not rows:
                rows.append(("ok", "", "", "", "", f"status {status}"))
            if unchecked:
                missing = sorted({f.evidence.get("missing", "") for f in unchecked} - {""})
                codes = ", ".join(f.code for f in unchecked)
                rows.append(
                    ("info", "not checked", codes, "", f"turn on probes=[{','.join(missing)}]", "")
                )
            for i, (severity, code, where, evidence, advice, message) in enumerate(rows):
                style = _STYLE.get(severity, "green")
                text = f"{message}\n{evidence}".strip() if message else evidence
                table.add_row(
                    *([escape(x) for x in lead] if i == 0 else [""] * len(lead)),
                    escape(shown) if i == 0 else "",
                    f"[{style}]{severity}[/]",
                    escape(code),
                    escape(where),
                    escape(text),
                    escape(advice),
                )
        console.print(table)


def _place(f: Finding) -> str:
    parts = [", ".join(f.layers)] if f.layers else []
    if f.steps:
        parts.append(
            f"steps {f.steps[0]}–{f.steps[1]}" if f.steps[0] != f.steps[1] else f"step {f.steps[0]}"
        )
    if f.epochs:
        parts.append(
            f"epochs {f.epochs[0]}–{f.epochs[1]}"
            if f.epochs[0] != f.epochs[1]
            else f"epoch {f.epochs[0]}"
        )
    return "\n".join(parts)


def _evidence(f: Finding) -> str:
    return "; ".join(f"{k}={v}" for k, v in f.evidence.items())
