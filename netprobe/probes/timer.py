"""Time spent inside probes: host time per probe, and per group of hook calls the host time or, on
a GPU, the time between CUDA events around it (kernels run after the host has moved on)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch


class ProbeTimer:
    """`begin()`, `lap(name)` after each probe's hooks, `end()`; `total` (seconds) counts GPU
    groups only once `settle()` has read their events back (at flushes, which sync anyway)."""

    def __init__(self, names: Iterable[str], device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.total = 0.0
        # Host time per probe names the costliest one in the closing summary.
        self.seconds = dict.fromkeys(names, 0.0)
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event, float]] = []
        self._start: torch.cuda.Event | None = None
        self._t0 = self._t = 0.0

    def begin(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        self._t0 = self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] += now - self._t
        self._t = now

    def end(self) -> None:
        host = self._t - self._t0
        if self._start is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((self._start, end, host))
            self._start = None
        else:
            self.total += host

    def settle(self) -> None:
        """Adds the GPU groups timed so far: the larger of host and event time each (syncs)."""
        for start, end, host in self._events:
            end.synchronize()
            self.total += max(host, start.elapsed_time(end) / 1e3)
        self._events = []

    def report(self, wall: float) -> dict[str, Any]:
        """run.json's fields: `probe_overhead`, the share of `wall` seconds spent in probes, and
        `probe_seconds`, each probe's host seconds."""
        return {
            "probe_overhead": self.total / wall if wall > 0 else None,
            "probe_seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }
