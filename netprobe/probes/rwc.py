"""Relative weight change per layer and epoch (SPEC §5 `rwc`; arXiv 2011.06735, Eq. 1), and every
`every_steps` steps if set; the weights each record compares with travel in the state_dict."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from netprobe.errors import ConfigError
from netprobe.probes.base import Probe, ProbeContext, StepState
from netprobe.probes.options import Option
from netprobe.probes.schedule import Schedule

MODES = ("l1", "elementwise")


def relative_weight_change(
    current: list[torch.Tensor], previous: list[torch.Tensor], mode: str = "l1"
) -> torch.Tensor:
    """Per tensor, in float64: `l1` rwc = ‖W_e − W_{e−1}‖₁ / ‖W_{e−1}‖₁ (the paper's Eq. 1);
    `elementwise` = mean over i with W_{e−1,i} ≠ 0 of |ΔW_i| / |W_{e−1,i}| (the original code's).
    """
    diffs = torch._foreach_sub(current, previous)
    if mode == "l1":
        change = torch.stack(torch._foreach_norm(diffs, 1, dtype=torch.float64))
        return change / torch.stack(torch._foreach_norm(previous, 1, dtype=torch.float64))
    sums, counts = [], []
    for diff, prev in zip(diffs, previous):
        nonzero = prev != 0
        ratio = torch.where(nonzero, diff.abs_().to(torch.float64) / prev.abs(), 0.0)
        sums.append(ratio.sum())
        counts.append(nonzero.sum())
    return torch.stack(sums) / torch.stack(counts).to(torch.float64)


class RelativeWeightChange(Probe):
    """After each epoch (and every `every_steps` steps if set): rwc of each tracked weight."""

    name = "rwc"
    measures = "rwc per tensor at the `at` points (each against the one before)"
    default_schedule = Schedule(at=("epoch",))
    options = (
        Option("mode", str, "l1", choices=MODES),
        Option("every_steps", int, None, low=1, nullable=True, note="a number of steps"),
    )

    def __init__(self, ctx: ProbeContext, **cfg: Any) -> None:
        # Its config says `every: epoch`; records every N steps are `every_steps`' (rwc_step).
        every = cfg.get("every")
        if every not in (None, "epoch"):
            raise ConfigError(
                f"probes.rwc.every={every!r} is not valid; valid: epoch (for a record every N "
                "steps as well, set probes.rwc.every_steps=N)"
            )
        if "at" in cfg:  # its records are the epochs' ends and every_steps' steps
            raise ConfigError(
                f"probes.rwc.at={cfg['at']!r}: rwc records at each epoch's end (every: epoch); "
                "for a record every N steps as well, set probes.rwc.every_steps=N"
            )
        super().__init__(ctx, **cfg)
        self.mode, self.every_steps = self.cfg["mode"], self.cfg["every_steps"]
        k = self.every_steps
        if k is not None:  # `rwc_step` after every k-th step: steps k − 1, 2k − 1, …
            self.schedule = replace(self.schedule, every=k, phase=k - 1)
            self.measures = f"rwc per tensor at the `at` points; rwc_step every {k} steps"
        # Default: every parameter of ndim > 1 (conv kernels, linear matrices, embeddings).
        self.params = self.select_params(lambda r: len(r.shape) > 1)
        self.names = [n for n, _ in self.params]
        self.tensors = [p for _, p in self.params]
        # One copy of the tracked weights, W_{e−1}: W₀ before the first step, refreshed in place
        # after each epoch's record; `rwc_step` needs a second one, W_{t−k}.
        self.previous: list[torch.Tensor] | None = None
        self.previous_step: list[torch.Tensor] | None = None

    def _copy(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.tensors]

    def start(self, state: StepState) -> None:
        if self.tensors:
            self.previous = self._copy()
            if self.every_steps is not None:
                self.previous_step = self._copy()

    def _record(self, metric: str, previous: list[torch.Tensor]) -> None:
        with torch.no_grad():
            values = relative_weight_change(self.tensors, previous, self.mode)
            torch._foreach_copy_(previous, self.tensors)
        self.ctx.record.scalars(self.name, self.names, [metric], values[:, None])

    def capture(self, state: StepState) -> None:
        if not self.tensors:
            return
        if self.previous is None:  # driven without `start`: this capture becomes W₀
            self.previous = self._copy()
            return
        self._record("rwc", self.previous)

    def after_step(self, state: StepState) -> None:
        if not self.tensors:
            return
        if self.previous_step is None:
            self.previous_step = self._copy()
            return
        self._record("rwc_step", self.previous_step)

    # -- resuming
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {**super().state_dict(), "names": list(self.names)}
        if self.previous is not None:
            state["previous"] = dict(zip(self.names, self.previous))
        if self.previous_step is not None:
            state["previous_step"] = dict(zip(self.names, self.previous_step))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for key, copies in self.load_tracked(state, "previous", "previous_step").items():
            setattr(self, key, copies)
