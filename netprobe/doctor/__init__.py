"""`netprobe doctor`: verdicts with their evidence, read from the stored tables alone (SPEC §1).
Each rule is a function of a run's tables and the thresholds; the README ("Doctor") lists them."""

from netprobe.doctor.common import (
    METRICS_READ,
    PROBES_READ,
    SEVERITIES,
    Finding,
    Thresholds,
    _Tables,
    thresholds,
)
from netprobe.doctor.curves import diverged, loss_plateau, no_learning, overfitting, unstable_loss
from netprobe.doctor.layers import (
    RECTIFIERS,
    _rectified,
    dead_units,
    gradient_scale,
    stalled_layer,
    symmetric_init,
    zero_gradients,
)
from netprobe.doctor.report import close_run, findings_html, report
from netprobe.doctor.rules import CODES, RULES, counts, diagnose, health, problems

__all__ = [
    "CODES",
    "METRICS_READ",
    "PROBES_READ",
    "RECTIFIERS",
    "RULES",
    "SEVERITIES",
    "Finding",
    "Thresholds",
    "_Tables",
    "_rectified",
    "close_run",
    "counts",
    "dead_units",
    "diagnose",
    "diverged",
    "findings_html",
    "gradient_scale",
    "health",
    "loss_plateau",
    "no_learning",
    "overfitting",
    "problems",
    "report",
    "stalled_layer",
    "symmetric_init",
    "thresholds",
    "unstable_loss",
    "zero_gradients",
]
