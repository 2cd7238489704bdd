"""Feature distributions of tracked modules on fixed inputs (SPEC §5 `activations`): per module
and input source, a histogram in bins that follow each capture's range, and its statistics."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from netprobe.errors import ConfigError
from netprobe.native import hist
from netprobe.probes.base import Probe, ProbeContext, StepState
from netprobe.probes.capture import output_tensor
from netprobe.probes.distributions import central_edges, distributions
from netprobe.probes.options import Option
from netprobe.probes.schedule import Schedule
from netprobe.structure import eval_mode

SOURCES = ("train", "valid", "random")
STATS = ["mean", "std", "skew", "zero_frac", "dead_frac"]
RANDOM_SALT = 0xAC71
MAX_TAIL = 0.005


def activation_stats(y: torch.Tensor, edges: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[mean, std, skew, zero_frac, dead_frac] of a batch of outputs y [B, ...] in float64, and
    its counts [bins + 2] (below, bins…, above) in `edges`.

    `zero_frac` = #(y ≤ 0)/numel, the share a ReLU would zero (exactly the zeros of a ReLU
    output); `dead_frac` = the share of units ≤ 0 for every sample, a unit being one position of
    the output flattened per sample (a feature, or a channel at one location).

    On a CPU one fused kernel (netprobe.native.hist) reads y twice for all of it, where it
    compiles: the same counts, and float64 sums in another order (equal to ~1e-13).
    """
    flat = y.detach().reshape(y.shape[0], -1)
    fused = hist.activation_stats(flat, edges)
    if fused is not None:
        return fused
    moments, counts, _ = distributions([flat], edges[None])
    inactive = flat <= 0
    # Counted as integers, then divided in float64: a float64 sum of booleans converts each one.
    zero_frac = torch.count_nonzero(inactive).to(torch.float64) / flat.numel()
    dead_frac = torch.count_nonzero(inactive.all(dim=0)).to(torch.float64) / flat.shape[1]
    return torch.cat([moments[0, :3], torch.stack([zero_frac, dead_frac])]), counts[0]


class Activations(Probe):
    """At `at` points: histogram and statistics of each tracked module's output, per source."""

    name = "activations"
    measures = "histogram, mean, std, skew, zero_frac, dead_frac per module output and source"
    default_schedule = Schedule(at=("start", "epoch"))
    options = (
        Option("sources", list, list(SOURCES), choices=SOURCES),
        Option("bins", int, 50, low=1),
        Option(
            "tail",
            float,
            0.001,
            low=0,
            high=MAX_TAIL,
            open=True,
            note="the share of each capture's values left outside each end of its bins "
            "(under 1 % in all)",
        ),
    )

    def __init__(self, ctx: ProbeContext, **cfg: Any) -> None:
        super().__init__(ctx, **cfg)
        self.bins, self.tail = self.cfg["bins"], float(self.cfg["tail"])
        self.sources = [s for s in SOURCES if s in self.cfg["sources"]]
        self.modules = self.select_modules()
        self.names = [n for n, _ in self.modules]
        if self.names and ctx.probe_batch is None and ctx.valid_batch is None:
            raise ConfigError(f"probes.{self.name} needs input: pass probe_batch=(x, y) to attach")

    def _inputs(self) -> list[tuple[str, torch.Tensor]]:
        """Each source's batch: `train` the fixed probe batch, `valid` the fixed validation batch,
        `random` uniform [0, 1) inputs of their shape, the same at every capture (run seed)."""
        ctx = self.ctx
        batches = {"train": ctx.probe_batch, "valid": ctx.valid_batch}
        shape_from = ctx.probe_batch if ctx.probe_batch is not None else ctx.valid_batch
        out = []
        for source in self.sources:
            if source == "random":
                x = shape_from[0]
                gen = ctx.generator(RANDOM_SALT, device=x.device)
                floating = x.dtype if x.is_floating_point() else torch.float32
                out.append(
                    (source, torch.rand(x.shape, generator=gen, device=x.device, dtype=floating))
                )
            elif batches[source] is not None:
                out.append((source, batches[source][0]))
        return out

    def capture(self, state: StepState) -> None:
        """The model runs in eval mode (each module's own flag restored after) on each source,
        with forward hooks on the tracked modules only meanwhile; each output is reduced on the
        device as it is produced, so none outlives its hook call. The bins span each capture's
        `tail` to 1 − `tail` quantiles (the rest counted in `below` and `above`), so features
        that grow during training keep their shape."""
        if not self.names:
            return
        model = self.ctx.model
        results: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

        def hook_for(name: str):
            def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
                y = output_tensor(output)
                if y is None or name in results or y.ndim == 0:
                    return  # a module called again within the forward: its first call counts
                edges = central_edges(y, self.bins, self.tail)
                results[name] = (*activation_stats(y, edges), edges)

            return hook

        handles = [m.register_forward_hook(hook_for(n)) for n, m in self.modules]
        try:
            # eval_mode gives back each module's own flag, so a frozen BatchNorm stays frozen.
            with eval_mode(model), torch.no_grad():
                for source, x in self._inputs():
                    results.clear()
                    model(x)
                    self._record(source, results)
        finally:
            for h in handles:
                h.remove()

    def _record(
        self, source: str, results: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    ) -> None:
        """The scalars table has no source column: the metric names carry it (`train/mean`,
        `valid/dead_frac`, `random/skew`)."""
        names = [n for n in self.names if n in results]
        if not names:
            return
        record = self.ctx.record
        stats = torch.stack([results[n][0] for n in names])
        record.scalars(self.name, names, [f"{source}/{s}" for s in STATS], stats)
        for name in names:
            _, counts, edges = results[name]
            record.histogram(self.name, name, source, edges, counts[1:-1], counts[0], counts[-1])
