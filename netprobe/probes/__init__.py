"""Probe groups by name (SPEC §5), each in its own module, and building them from a run's
`probes` settings."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from netprobe.errors import ConfigError
from netprobe.probes.activations import Activations
from netprobe.probes.augmentation import Augmentation
from netprobe.probes.base import Probe, ProbeContext, StepState
from netprobe.probes.channels import Channels
from netprobe.probes.correlation import Correlation
from netprobe.probes.gradient_flow import GradientFlow
from netprobe.probes.gradients import Gradients
from netprobe.probes.optim_dynamics import OptimDynamics
from netprobe.probes.options import Option
from netprobe.probes.rwc import RelativeWeightChange
from netprobe.probes.schedule import ProbeRunner, Schedule
from netprobe.probes.weights import Weights
from netprobe.recorder import Recorder
from netprobe.structure import layer_table, module_graph

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

ProbeSpec = Sequence[str] | Mapping[str, Mapping[str, Any] | None] | None


def probe_configs(probes: ProbeSpec) -> dict[str, dict[str, Any]]:
    """Each named probe's settings ({} where none are given); an unknown name is refused."""
    if probes is None:
        return {}
    if isinstance(probes, str):
        probes = [probes]
    items = probes.items() if isinstance(probes, Mapping) else ((n, None) for n in probes)
    configs = {}
    for name, cfg in items:
        if name not in PROBES:
            raise ConfigError(f"unknown probe {name!r}; valid probes: {', '.join(PROBES)}")
        configs[name] = dict(cfg or {})
    return configs


def probe_context(
    model: nn.Module,
    probe_batch: tuple[torch.Tensor, torch.Tensor] | None,
    valid_batch: tuple[torch.Tensor, torch.Tensor] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    seed: int = 0,
    state: StepState | None = None,
) -> ProbeContext:
    """What probes are built on: the model's layers in forward order (traced on the probe batch),
    the data-flow edges between its modules, and a recorder tagging records with `state`'s step
    and epoch (a fresh state at step 0 if None)."""
    layers = layer_table(model, probe_batch[0] if probe_batch is not None else None)
    return ProbeContext(
        model=model,
        layers=layers,
        edges=module_graph(model, [r.module for r in layers if not r.param]),
        record=Recorder(state if state is not None else StepState()),
        loss_fn=loss_fn,
        probe_batch=probe_batch,
        valid_batch=valid_batch,
        seed=seed,
    )


def build_probes(ctx: ProbeContext, probes: ProbeSpec) -> list[Probe]:
    """The enabled probes, built on `ctx`; bad settings raise ConfigError before anything exists."""
    built: list[Probe] = []
    try:
        for name, cfg in probe_configs(probes).items():
            enabled = cfg.get("enabled", True)
            if not isinstance(enabled, bool):
                raise ConfigError(f"probes.{name}.enabled={enabled!r}; valid: true, false")
            if enabled:
                built.append(PROBES[name](ctx, **cfg))
    except BaseException:
        close_probes(built)  # their hooks must not stay on the user's model
        raise
    return built


def close_probes(probes: list[Probe]) -> None:
    """Releases what each probe holds on the model (its hooks)."""
    for probe in probes:
        probe.close()


__all__ = [
    "PROBES",
    "Option",
    "Probe",
    "ProbeContext",
    "ProbeRunner",
    "ProbeSpec",
    "Schedule",
    "StepState",
    "build_probes",
    "close_probes",
    "probe_context",
]
