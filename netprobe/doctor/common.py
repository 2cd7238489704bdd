"""What every doctor rule shares: the thresholds, the finding it returns, the tables it reads
(each fetched once per run) and the helpers that put numbers into evidence."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
import pandas as pd

from netprobe.errors import ConfigError
from netprobe.store import Run

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
        share = key.endswith("_frac")  # a share of units, entries or steps, or of the start loss
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = (
            ok
            and math.isfinite(value)
            and value > 0
            and (not want_int or float(value).is_integer())
            and (not share or value <= 1)
        )
        if not ok:
            kind = "a positive integer" if want_int else "a positive number"
            kind = "a fraction in (0, 1]" if share else kind
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

    def finite_curve(self, metric: str) -> pd.DataFrame:
        """`curve` without its non-finite values."""
        curve = self.curve(metric)
        return curve[np.isfinite(curve["value"])]

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


def _missing(t: _Tables, code: str, probes: str, what: str) -> Finding:
    """`code` not checked for want of `what`: turn on the probe, or, where it was on and recorded
    nothing this check reads, say why that may be."""
    on = probes in (t.run.info.get("probes") or [])
    return Finding(
        code,
        "info",
        f"not checked: {what} was not recorded",
        evidence={"missing": probes, "probe_on": on},
        advice=missing_advice([], [probes]) if on else f"turn on probes=[{probes}] to check {code}",
    )


def missing_advice(off: list[str], on: list[str]) -> str:
    """What helps checks left undone: the probes to turn on, and those on that recorded nothing
    the checks read (their layers/exclude selected no layer, or the run ended before a capture)."""
    parts = [f"turn on probes=[{','.join(off)}]"] if off else []
    parts += [
        f"probes.{p} was on but recorded none of it: its layers/exclude select no layer, or the "
        "run ended before its first capture"
        for p in on
    ]
    return "; ".join(parts)


def _window(n: int, frac: float = 0.1) -> int:
    return max(1, int(round(n * frac)))


def _ends(values: np.ndarray) -> tuple[float, float]:
    """The medians of the first and of the last tenth of `values`."""
    w = _window(len(values))
    return np.median(values[:w]), np.median(values[-w:])


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


def _curve_finding(
    code: str,
    severity: str,
    message: str,
    curve: pd.DataFrame,
    steps: tuple[int, int] | None,
    evidence: dict[str, Any],
    advice: str,
    layers: Sequence[str] = (),
) -> list[Finding]:
    """A finding read off a training `curve` over `steps` (the epochs they span from it), shown
    by the training curves."""
    return [
        Finding(
            code,
            severity,
            message,
            layers=list(layers),
            steps=steps,
            epochs=_epochs_of(curve, steps),
            evidence=evidence,
            advice=advice,
            figure="training_curves",
        )
    ]


def _layer_warning(
    code: str,
    what: str,
    values: Mapping[str, pd.Series],
    evidence: Mapping[str, Any],
    steps: tuple[int, int] | None,
    epochs: tuple[int, int] | None,
    advice: str,
    figure: str,
) -> list[Finding]:
    """A warning `N <what>` naming the layers of the first of `values` (evidence name → layer
    → value, one per layer hit), or nothing when no layer is hit."""
    hit = next(iter(values.values()))
    if hit.empty:
        return []
    return [
        Finding(
            code,
            "warning",
            f"{len(hit)} {what}",
            layers=list(hit.index),
            steps=steps,
            epochs=epochs,
            evidence={
                **{key: {n: _r(x) for n, x in per.items()} for key, per in values.items()},
                **evidence,
            },
            advice=advice,
            figure=figure,
        )
    ]
