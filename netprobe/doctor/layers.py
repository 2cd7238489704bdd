"""Rules on per-layer evidence: gradient scale, dead units, zero gradients, stalled layers and
symmetric initialization."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from netprobe.doctor.common import (
    Finding,
    Thresholds,
    _curve_finding,
    _ends,
    _epochs_of,
    _layer_warning,
    _missing,
    _r,
    _span,
    _Tables,
    _window,
)

# Modules after which an output that is ≤ 0 for every sample is a unit that never fires.
RECTIFIERS = {"ReLU", "ReLU6", "RReLU", "Threshold"}


def gradient_scale(t: _Tables, th: Thresholds) -> list[Finding]:
    """Warnings: a layer whose RMS gradient (‖g‖₂/√numel, median over steps) is ≤
    `vanishing_ratio` or ≥ `exploding_ratio` × the median layer's (exploding only when none
    vanishes); the model-wide gradient norm peaking at `exploding_growth` × its median over the
    first tenth of steps, or ending that much below it while the loss stays above
    `plateau_loss_frac` of its start."""
    return [*_gradient_norm_trend(t, th), *_layer_gradient_scale(t, th)]


def _gradient_norm_trend(t: _Tables, th: Thresholds) -> list[Finding]:
    """The model-wide half of `gradient_scale`: the gradient norm's growth, or its shrinking
    while the loss stays high."""
    total = t.finite_curve("grad_l2_total")
    if len(total) < 20:
        return []
    values = total["value"].to_numpy()
    w = _window(len(values))
    start, end = _ends(values)
    peak = values[w:].max()
    loss = t.finite_curve("loss")["value"].to_numpy()
    stuck = len(loss) >= 20 and np.median(loss[-w:]) >= th.plateau_loss_frac * np.median(loss[:w])
    growth = peak / start if start > 0 else math.inf
    shrink = end / start if start > 0 else math.inf
    evidence = {"grad_norm_start": _r(start), "grad_norm_peak": _r(peak), "grad_norm_end": _r(end)}
    if growth >= th.exploding_growth:
        steps = _span(total["step"].to_numpy()[w:][values[w:] >= th.exploding_growth * start])
        message = f"the gradient norm grew {growth:.3g}-fold over training"
        evidence |= {"growth": _r(growth), "threshold": th.exploding_growth}
        code = "exploding_gradients"
        advice = "lower the learning rate, clip gradients, or add normalization layers"
    elif stuck and shrink <= 1 / th.exploding_growth:
        steps = (int(total["step"].iloc[0]), int(total["step"].iloc[-1]))
        message = f"the gradient norm shrank {1 / shrink:.3g}-fold while the loss stayed high"
        evidence |= {"shrink": _r(shrink), "threshold": 1 / th.exploding_growth}
        code = "vanishing_gradients"
        advice = "use ReLU-like activations, normalization layers or a variance-preserving init"
    else:
        return []
    return _curve_finding(code, "warning", message, total, steps, evidence, advice)


def _layer_gradient_scale(t: _Tables, th: Thresholds) -> list[Finding]:
    """The per-layer half of `gradient_scale`: RMS gradients far from the model's median layer."""
    probe, metric = (
        ("gradients", "l2") if t.has("gradients", "l2") else ("gradient_flow", "w_grad_l2")
    )
    if not t.has(probe, metric):
        return [_missing(t, "vanishing_gradients", "gradients", "per-layer gradient norms")]
    wide = t.per_layer(probe, metric)
    wide = wide.where(np.isfinite(wide))
    sizes = np.array([max(t.numel(n), 1) for n in wide.columns], float)
    rms = pd.Series(np.nanmedian(wide.to_numpy() / np.sqrt(sizes), axis=0), wide.columns)
    rms = rms[np.isfinite(rms.to_numpy())]
    median = float(np.median(rms.to_numpy())) if len(rms) >= 3 else 0.0
    if median <= 0:
        return []
    ratio = rms / median
    steps = _span(wide.index[[0, -1]])
    epochs = _epochs_of(t.metric(probe, metric), steps)
    vanishing = ratio <= th.vanishing_ratio
    # Beside vanishing layers every other layer is far above the median: that is the same
    # problem seen from the other side, so a layer counts as exploding only when none vanish.
    exploding = (ratio >= th.exploding_ratio) & ~vanishing.any()
    figure = "grad_flow_bars" if probe == "gradients" else "gradient_flow_graph"
    found = []
    for code, hit, limit, where, advice in (
        (
            "vanishing_gradients",
            vanishing,
            th.vanishing_ratio,
            "below",
            "use ReLU-like activations, residual connections, normalization, or a "
            "variance-preserving init (kaiming/xavier)",
        ),
        (
            "exploding_gradients",
            exploding,
            th.exploding_ratio,
            "above",
            "lower the learning rate, clip gradients, or use a variance-preserving init",
        ),
    ):
        found += _layer_warning(
            code,
            f"layer(s) with gradients {where} {limit:g} × the model's median layer",
            {"rms_grad": rms[hit], "ratio_to_median": ratio[hit]},
            {"model_median_rms_grad": _r(median), "threshold": limit},
            steps,
            epochs,
            advice,
            figure,
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
        return [_missing(t, "dead_units", "activations", "activations' dead_frac on train inputs")]
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
    return _layer_warning(
        "dead_units",
        f"layer(s) with ≥ {th.dead_frac:.0%} of units that never fire",
        {"dead_frac": hit},
        {"threshold": th.dead_frac},
        steps,
        _epochs_of(t.metric("activations", "train/dead_frac"), steps),
        "lower the learning rate, use LeakyReLU/GELU, or an init that keeps pre-activations "
        "centred",
        "activation_stats",
    )


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
        return [_missing(t, "zero_gradients", "gradients", "per-layer gradients")]
    hit = value[value >= limit]
    if hit.empty:
        return []
    return _layer_warning(
        "zero_gradients",
        "layer(s) whose gradients are almost all exactly zero",
        {metric: hit},
        {"threshold": limit},
        _span(late.index[[0, -1]]),
        None,
        "look for dead ReLUs, a detached or unused branch, or saturated activations",
        figure,
    )


def stalled_layer(t: _Tables, th: Thresholds) -> list[Finding]:
    """Warning: a layer whose weight change (median `rwc` over epochs, else the last `dist_init`)
    is ≤ `stall_ratio` × the model's median layer while that median is above zero."""
    if t.has("rwc", "rwc"):
        probe, metric, figure = "rwc", "rwc", "rwc_heatmap"
        wide = t.per_layer(probe, metric)
        change = wide.median()
    elif t.has("weights", "dist_init"):
        probe, metric, figure = "weights", "dist_init", "weights_stats"
        wide = t.per_layer(probe, metric)
        change = wide.iloc[-1]
    else:
        return [_missing(t, "stalled_layer", "rwc", "relative weight change (rwc or weights)")]
    change = change[np.isfinite(change)]
    if len(change) < 2:
        return []
    median = float(change.median())
    if median <= 0:
        return []
    steps = _span(wide.index[[0, -1]])
    return _layer_warning(
        "stalled_layer",
        "layer(s) whose weights barely move while the others learn",
        {metric: change[change <= th.stall_ratio * median]},
        {"model_median": _r(median), "threshold": th.stall_ratio},
        steps,
        _epochs_of(t.metric(probe, metric), steps),
        "check that the layer is trainable and in the optimizer, and its learning rate",
        figure,
    )


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
            return [_missing(t, "symmetric_init", "weights", "weight std per layer")]
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
