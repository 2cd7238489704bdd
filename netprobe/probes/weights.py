"""Weight distributions at start and after each epoch (SPEC §5 `weights`): per tracked tensor a
histogram in bins fixed at the first capture, its moments and `dist_init`."""

from __future__ import annotations

from typing import Any

import torch

from netprobe.probes.base import Probe, ProbeContext, StepState
from netprobe.probes.distributions import MOMENTS, distributions, symmetric_edges
from netprobe.probes.options import Option
from netprobe.probes.schedule import Schedule

METRICS = [*MOMENTS, "dist_init"]
PARAMS = ("weights", "all")


def distance_to_initial(distance: torch.Tensor, initial_norm: torch.Tensor) -> torch.Tensor:
    """`dist_init` = ‖W − W₀‖₂ / ‖W₀‖₂; NaN where W₀ = 0 (zero-initialised biases), where the
    ratio has no meaning."""
    return torch.where(initial_norm > 0, distance / initial_norm, torch.nan)


class Weights(Probe):
    """At `at` points: fixed-bin histogram and moments of each tracked parameter."""

    name = "weights"
    measures = "histogram, mean, std, skew, min, max, l2, dist_init per tensor"
    default_schedule = Schedule(at=("start", "epoch"))
    options = (Option("params", str, "weights", choices=PARAMS), Option("bins", int, 50, low=1))

    def __init__(self, ctx: ProbeContext, **cfg: Any) -> None:
        super().__init__(ctx, **cfg)
        params, self.bins = self.cfg["params"], self.cfg["bins"]
        # `all`: every parameter, biases and norm-layer scales and shifts included.
        self.params = self.select_params((lambda r: True) if params == "all" else None)
        self.names = [n for n, _ in self.params]
        self.tensors = [p for _, p in self.params]
        self.sources = ["bias" if n.rsplit(".", 1)[-1] == "bias" else "weight" for n in self.names]
        self.initial: list[torch.Tensor] | None = None  # W₀, one copy
        self.initial_norm: torch.Tensor | None = None  # ‖W₀‖₂ per tensor, float64
        # [L, bins + 1] at ±2·max|W| of the first capture, for the whole run; values outside are
        # counted in `below` / `above`. W₀ and the edges travel in the state_dict for resuming.
        self.edges: torch.Tensor | None = None

    def _snapshot_initial(self) -> None:
        self.initial = [p.detach().clone() for p in self.tensors]
        self.initial_norm = torch.stack(torch._foreach_norm(self.initial, 2, dtype=torch.float64))

    def start(self, state: StepState) -> None:
        if self.tensors:
            self._snapshot_initial()

    def capture(self, state: StepState) -> None:
        if not self.tensors:
            return
        if self.initial is None:  # driven without `start`: the first capture is W₀
            self._snapshot_initial()
        if self.edges is None:
            self.edges = symmetric_edges(self.tensors, self.bins)
        stats, counts, distance = distributions(self.tensors, self.edges, self.initial)
        dist_init = distance_to_initial(distance, self.initial_norm)
        values = torch.cat([stats, dist_init[:, None]], dim=1)
        record = self.ctx.record
        record.scalars(self.name, self.names, METRICS, values)
        for i, (name, source) in enumerate(zip(self.names, self.sources)):
            row = counts[i]
            record.histogram(self.name, name, source, self.edges[i], row[1:-1], row[0], row[-1])

    # -- resuming
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {**super().state_dict(), "names": list(self.names)}
        if self.initial is not None:
            state["initial"] = dict(zip(self.names, self.initial))
        if self.edges is not None:
            state["edges"] = self.edges
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        restored = self.load_tracked(state, "initial")
        if "initial" in restored:
            self.initial = restored["initial"]
            self.initial_norm = torch.stack(
                torch._foreach_norm(self.initial, 2, dtype=torch.float64)
            )
        if "edges" in state:
            device = self.tensors[0].device
            self.edges = state["edges"].to(device=device, dtype=torch.float64).clone()
