"""The rules in the order they run, and one run's diagnosis and health."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import fields
from typing import Any

from netprobe.doctor.common import SEVERITIES, Finding, Thresholds, _Tables, thresholds
from netprobe.doctor.curves import diverged, loss_plateau, no_learning, overfitting, unstable_loss
from netprobe.doctor.layers import (
    dead_units,
    gradient_scale,
    stalled_layer,
    symmetric_init,
    zero_gradients,
)
from netprobe.store import Run, load

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
