"""Probe groups by name (SPEC §5); each lives in its own module."""

from __future__ import annotations

from netprobe.probes.activations import Activations
from netprobe.probes.augmentation import Augmentation
from netprobe.probes.base import Probe, ProbeContext, Progress
from netprobe.probes.channels import Channels
from netprobe.probes.correlation import Correlation
from netprobe.probes.gradient_flow import GradientFlow
from netprobe.probes.gradients import Gradients
from netprobe.probes.optim_dynamics import OptimDynamics
from netprobe.probes.options import Option
from netprobe.probes.rwc import RelativeWeightChange
from netprobe.probes.weights import Weights

PROBES: dict[str, type[Probe]] = {
    cls.name: cls
    for cls in [
        Gradients,
        GradientFlow,
        Weights,
        RelativeWeightChange,
        OptimDynamics,
        Activations,
        Correlation,
        Augmentation,
        Channels,
    ]
}

__all__ = ["PROBES", "Option", "Probe", "ProbeContext", "Progress"]
