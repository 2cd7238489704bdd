"""When each probe runs: its `Schedule` (a value), and `ProbeRunner`, which calls the probes'
hooks at the steps and points their schedules name. The one place that decides "when"."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from netprobe.errors import ConfigError
from netprobe.probes.options import as_list
from netprobe.probes.timer import ProbeTimer

if TYPE_CHECKING:
    import numpy as np

    from netprobe.native.step import Read
    from netprobe.probes.base import Probe, StepState

AT_CHOICES = ("start", "epoch", "end")


@dataclass(frozen=True)
class Schedule:
    """Steps t with t % every == phase (none without `every`) get `after_backward` and
    `after_step`; the `at` points (`start` before the first step, `epoch` after each epoch, `end`
    after training) get `capture`. With `arm`, each recorded step is announced by `arm`: during
    the step before (after its backward), or before it when it is the first of a process (a hook
    to set for the coming forward pass, or the previous step's gradient to keep)."""

    every: int | None = None
    at: tuple[str, ...] = ()
    arm: bool = False
    phase: int = 0

    @classmethod
    def parse(cls, probe: str, default: Schedule, cfg: Mapping[str, Any]) -> Schedule:
        """The schedule a probe's config `cfg` asks for with `every` and `at` (each absent: the
        probe's default); `every: epoch` means `at: [epoch]`. Settings it would ignore fail."""
        every, at = cfg.get("every", default.every), cfg.get("at", default.at)
        if every == "epoch":
            given = tuple(as_list(cfg.get("at", ("epoch",))))
            if given != ("epoch",):  # not replaced silently by the epoch's end
                raise ConfigError(
                    f"probes.{probe}.at={list(given)} with probes.{probe}.every=epoch, which "
                    f"records at each epoch's end only; give one of them"
                )
            every, at = None, ("epoch",)
        # A setting the probe would ignore is an error, not a run that silently records nothing.
        if default.every is None and every is not None:
            raise ConfigError(
                f"probes.{probe}.every={every!r}: {probe} captures at fixed points, not "
                f"every N steps; set probes.{probe}.at (valid: {', '.join(AT_CHOICES)})"
            )
        if every is not None and (not isinstance(every, int) or every < 1):
            raise ConfigError(
                f"probes.{probe}.every={every!r} must be a positive number of steps or 'epoch'"
            )
        at = tuple(as_list(at))
        for point in at:
            if point not in AT_CHOICES:
                raise ConfigError(
                    f"probes.{probe}.at has {point!r}; valid: {', '.join(AT_CHOICES)}"
                )
        if not default.at and at:
            raise ConfigError(
                f"probes.{probe}: {probe} records every N steps, not at {list(at)}; "
                f"set probes.{probe}.every to a positive number of steps"
            )
        return cls(every, at, default.arm, default.phase)

    def records(self, step: int) -> bool:
        """Whether step `step` (counted from 0) gets `after_backward` and `after_step`."""
        return self.every is not None and step % self.every == self.phase

    def describe(self) -> str:
        """In words, e.g. 'every 10 steps, armed the step before; at start, epoch'."""
        parts = []
        if self.every is not None:
            steps = "every step" if self.every == 1 else f"every {self.every} steps"
            if self.phase:
                steps += f" (steps {self.phase}, {self.phase + self.every}, …)"
            parts.append(steps + (", armed the step before" if self.arm else ""))
        if self.at:
            parts.append(f"at {', '.join(self.at)}")
        return "; ".join(parts) or "never"


class ProbeRunner:
    """Calls each probe's hooks when its schedule says, with the one `StepState`, and advances
    its counters: what the monitor does between the training loop's calls, without writing."""

    def __init__(
        self, probes: Sequence[Probe], state: StepState, device: torch.device | None = None
    ) -> None:
        self.probes, self.state = list(probes), state
        self.timer = ProbeTimer([p.name for p in self.probes], device or torch.device("cpu"))
        # The probes with per-step hooks of their own: each call of one that does nothing costs
        # µs of a small model's step.
        self._reading = [p for p in self.probes if _has(p, "after_backward") or _has(p, "arm")]
        self._stepping = [p for p in self.probes if _has(p, "after_step")]

    def start(self) -> None:
        """A new run, before its first step: each probe's `start` and `start` captures, then
        `arm` where step 0 is recorded."""
        if not self.probes:
            return
        state, timer = self.state, self.timer
        state.point = "start"
        timer.begin()
        for probe in self.probes:
            probe.start(state)
            if "start" in probe.schedule.at:
                probe.at_point(state)
            timer.lap(probe.name)
        timer.end()
        state.point = None
        self.resume()

    def resume(self) -> None:
        """Arms the probes whose schedule records the coming step, the first of this process."""
        armed = [p for p in self.probes if p.schedule.arm and p.schedule.records(self.state.step)]
        if armed:
            self.timer.begin()
            for probe in armed:
                probe.arm(self.state)
                self.timer.lap(probe.name)
            self.timer.end()

    def after_backward(
        self,
        loss: torch.Tensor,
        grad_l2_total: torch.Tensor | float | None = None,
        loss_scale: torch.Tensor | float | None = None,
        grad_rows: np.ndarray | None = None,
        grad_read: Read | None = None,
    ) -> None:
        """The step's facts into the state; `after_backward` where this step is recorded, then
        `arm` where the next one is."""
        state, timer, step = self.state, self.timer, self.state.step
        state.loss, state.grad_l2_total, state.loss_scale = loss, grad_l2_total, loss_scale
        state.grad_rows = grad_rows
        if not self._reading:
            return
        state.grad_read = grad_read
        timer.begin()
        try:
            for probe in self._reading:
                schedule = probe.schedule
                if schedule.records(step):
                    probe.after_backward(state)
                if schedule.arm and schedule.records(step + 1):
                    probe.arm(state)
                timer.lap(probe.name)
        finally:
            state.grad_read = None  # it holds the gradients
        timer.end()

    def after_step(self) -> None:
        """`after_step` where this step is recorded; the step counter advances."""
        state, timer = self.state, self.timer
        if self._stepping:
            timer.begin()
            for probe in self._stepping:
                if probe.schedule.records(state.step):
                    probe.after_step(state)
                timer.lap(probe.name)
            timer.end()
        state.step += 1

    def end_epoch(self) -> None:
        """The `epoch` captures; the epoch counter advances."""
        self._captures("epoch")
        self.state.epoch += 1

    def end(self) -> None:
        """The `end` captures, stored under the epoch they follow (the last one trained), as an
        epoch-end capture at the same step is: every capture's epoch is the epoch behind it."""
        done = self.state.epoch
        self.state.epoch = max(done - 1, 0)
        try:
            self._captures("end")
        finally:
            self.state.epoch = done

    def _captures(self, point: str) -> None:
        taking = [p for p in self.probes if point in p.schedule.at]
        if not taking:
            return
        self.state.point = point
        self.timer.begin()
        try:
            for probe in taking:
                probe.at_point(self.state)
                self.timer.lap(probe.name)
        finally:
            self.state.point = None
        self.timer.end()

    def state_dict(self) -> dict[str, Any]:
        """The counters and each probe's own state (what it carries between steps, and its last
        capture), by probe name."""
        probes = {p.name: p.state_dict() for p in self.probes}
        return {"step": self.state.step, "epoch": self.state.epoch, "probes": probes}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.state.step, self.state.epoch = state["step"], state["epoch"]
        for probe in self.probes:
            saved = state["probes"].get(probe.name)
            if saved is not None and saved.keys() == {"state", "last_capture"}:
                # An earlier version's checkpoint: the last capture's step beside the state.
                last = saved["last_capture"]
                saved = {**saved["state"], "last_capture": None if last is None else (last, None)}
            if saved is not None:
                probe.load_state_dict(saved)


def _has(probe: Probe, hook: str) -> bool:
    """Whether the probe has a hook `hook` of its own (its class's, or one set on it), not the
    base class's no-op; asked when the runner is made."""
    from netprobe.probes.base import Probe  # which imports this module

    method = getattr(probe, hook)
    return getattr(method, "__func__", method) is not getattr(Probe, hook)


NOTHING_TO_TRACK = "nothing to track on this model: its layers/exclude select no tensor or module"


def listing(probes: Sequence[Probe]) -> list[str]:
    """One line per probe: its name, its schedule in words, and what it records."""
    rows = [
        (p.name, p.schedule.describe(), NOTHING_TO_TRACK if p.tracks_nothing else p.measures)
        for p in probes
    ]
    if not rows:
        return []
    name_width = max(len(r[0]) for r in rows)
    when_width = max(len(r[1]) for r in rows)
    return [f"{n:<{name_width}}  {w:<{when_width}}  {m}".rstrip() for n, w, m in rows]
