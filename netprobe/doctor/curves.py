"""Rules read off the training curves: divergence, chance-level accuracy, plateaus,
overfitting and loss spikes."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from netprobe.doctor.common import (
    Finding,
    Thresholds,
    _curve_finding,
    _ends,
    _r,
    _span,
    _Tables,
    _window,
)


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
        return _loss_grew(loss, values[np.isfinite(values)], th)
    return _nonfinite_loss(t, loss, int(first_bad))


def _loss_grew(loss: pd.DataFrame, finite: np.ndarray, th: Thresholds) -> list[Finding]:
    """`diverged` without a non-finite loss: the last tenth's median ≥ `divergence_growth` ×
    the first tenth's."""
    if len(finite) < 10:
        return []
    start, end = _ends(finite)
    if end < th.divergence_growth * start:
        return []
    return _curve_finding(
        "diverged",
        "error",
        f"the training loss grew {end / start:.3g}-fold without becoming non-finite",
        loss,
        (int(loss["step"].iloc[0]), int(loss["step"].iloc[-1])),
        {
            "loss_start": _r(start),
            "loss_end": _r(end),
            "growth": _r(end / start),
            "threshold": th.divergence_growth,
        },
        "lower the learning rate, or clip gradients",
    )


def _nonfinite_loss(t: _Tables, loss: pd.DataFrame, first_bad: int) -> list[Finding]:
    """`diverged` at the first non-finite loss, with the losses and gradient norms before it and
    the layers whose gradients went non-finite first."""
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
    return _curve_finding(
        "diverged",
        "error",
        f"the training loss became non-finite at step {first_bad}",
        loss,
        (first_bad, first_bad),
        evidence,
        "lower the learning rate, clip gradients, or check the input normalization",
        layers,
    )


def loss_plateau(t: _Tables, th: Thresholds) -> list[Finding]:
    """Warning: the median loss over the last quarter of steps improves on the quarter before by
    less than `plateau_improvement`, while between `plateau_loss_frac` × its first tenth and that
    first tenth itself (a loss that ended higher rose, it did not level off), and the
    last epoch's validation loss (when recorded) improves on the epoch before by less than that
    too: a run whose validation loss still falls is learning, however slowly its loss moves."""
    val = t.curve("val_loss")["value"].to_numpy()
    val = val[np.isfinite(val)]
    if len(val) >= 2 and val[-2] > 0 and 1 - val[-1] / val[-2] >= th.plateau_improvement:
        return []
    loss = t.finite_curve("loss")
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
    if last > start:  # it rose above where it started: for `diverged` and `unstable_loss`
        return []
    return _curve_finding(
        "loss_plateau",
        "warning",
        f"the loss stopped improving at {last / start:.0%} of where it started",
        loss,
        (int(loss["step"].iloc[-2 * q]), int(loss["step"].iloc[-1])),
        {
            "loss_start": _r(start),
            "loss_previous_quarter": _r(before),
            "loss_last_quarter": _r(last),
            "improvement": _r(improvement),
            "threshold": th.plateau_improvement,
        },
        "raise the learning rate or change the optimizer/schedule; check the data and labels",
    )


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
    loss = t.finite_curve("loss")
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
    return _curve_finding(
        "unstable_loss",
        "warning",
        f"{int(spike.sum())} loss spikes ({share:.1%} of steps)",
        loss,
        _span(steps_at),
        evidence,
        "lower the learning rate, use warm-up, or clip gradients",
    )


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
