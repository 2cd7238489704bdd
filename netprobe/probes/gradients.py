"""Per-layer gradient statistics, every step by default (SPEC §5 `gradients`)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from netprobe.native import HostBlocks
from netprobe.native import step as native_step
from netprobe.probes.base import Probe, StepState, trained_positions
from netprobe.probes.reductions import device_sizes, stat_dtype
from netprobe.probes.schedule import Schedule
from netprobe.probes.segments import Segments

METRICS = ["l1", "l2", "mean_abs", "max_abs", "nonfinite"]


def gradient_stats(
    grads: list[torch.Tensor], segments: Segments | None = None, scratch: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tensor [l1 = Σ|g|, l2 = √Σg², mean_abs = l1/numel, max_abs = max|g|,
    nonfinite = #(g is NaN or ±inf)], and ‖g‖₂ overall.

    |g| is written once into a flat buffer (`scratch`, reused across steps) and every statistic is
    a segment reduction of it; nothing leaves the device. Half-precision gradients are summed in
    float32 (a bf16 sum over a large tensor keeps ~3 significant digits).
    """
    segments = segments or Segments([g.numel() for g in grads])
    dtype = stat_dtype(grads)
    if scratch is None:
        scratch = segments.buffer(dtype, grads[0].device)
    for g, part in zip(grads, segments.parts(scratch)):
        # |g| straight into the buffer: one read of g and one write, no copy first.
        torch.abs(g.reshape(-1), out=part) if g.dtype == dtype else part.copy_(g.reshape(-1)).abs_()
    l1, l2, max_abs = segments.sum(scratch), segments.norm(scratch), segments.amax(scratch)
    # 1 where finite (NaN compares false), in place: the buffer is spent. Counted exactly.
    torch.le(scratch, torch.finfo(dtype).max, out=scratch)
    sizes = device_sizes(tuple(segments.sizes), l1.device, dtype)
    nonfinite = sizes - segments.count(scratch).to(dtype)
    return torch.stack([l1, l2, l1 / sizes, max_abs, nonfinite], dim=1), torch.linalg.vector_norm(
        l2
    )


class Gradients(Probe):
    name = "gradients"
    measures = "l1, l2, mean_abs, max_abs, nonfinite per tensor; grad_l2_total"
    default_schedule = Schedule(every=1)

    def __init__(self, ctx, **cfg) -> None:
        super().__init__(ctx, **cfg)
        self.params = self.select_dense_grads()
        self.names = [n for n, _ in self.params]
        # Its tensors' rows of StepState.grad_rows, the monitor's read of every gradient on the
        # CPU: a view where evenly spaced (weights between biases), else a copy; None where
        # one of them is not trained, when it reads its own.
        self._rows = picker(trained_positions(ctx.model, [p for _, p in self.params]))
        self.reads_grad_rows = self._rows is not None
        # Per set of tensors with a gradient (all of them, nearly always): their names, and what
        # reduces them: one fused pass on the CPU, else segment reductions of a flat buffer.
        self._layouts: dict[tuple[int, ...], tuple[list[str], Callable]] = {}

    def _reduction(self, grads: list[torch.Tensor]) -> Callable:
        kernels = native_step.kernels(grads)
        if kernels is not None:
            blocks = HostBlocks(len(grads), len(METRICS))

            def fused(gs: list[torch.Tensor]) -> np.ndarray:
                out = blocks.next()
                kernels.grad_stats(gs, out)
                return out.array

            return fused
        segments = Segments([g.numel() for g in grads])
        buffer = segments.buffer(stat_dtype(grads), grads[0].device)
        return lambda gs: gradient_stats(gs, segments, buffer)[0]

    def after_backward(self, state: StepState) -> None:
        if state.grad_rows is not None and self._rows is not None:
            # Every trained parameter has its gradient: these are all of this probe's.
            self.ctx.record.scalars(self.name, self.names, METRICS, state.grad_rows[self._rows])
        else:
            self._read()
        # Model-wide, biases and norm layers included: the monitor's norm for the training curve.
        total = state.grad_l2_total
        if total is not None:
            self.ctx.record.scalars(self.name, [""], ["grad_l2_total"], total)

    def _read(self) -> None:
        """Its own read of the gradients it tracks that have one."""
        grads = [p.grad for _, p in self.params]
        present = tuple(i for i, g in enumerate(grads) if g is not None)
        if not present:
            return
        grads = [grads[i] for i in present]
        if present not in self._layouts:
            self._layouts[present] = ([self.names[i] for i in present], self._reduction(grads))
        names, reduce = self._layouts[present]
        try:
            values = reduce(grads)
        except (native_step.Unreadable, RuntimeError) as exc:
            self.failed_read(self.params, exc)
        self.ctx.record.scalars(self.name, names, METRICS, values)


def picker(rows: list[int | None]) -> slice | np.ndarray | None:
    """What picks `rows` out of an array's first axis: a slice (a view) where they are evenly
    spaced and ascending, else an index array; None where one is missing or there are none."""
    if not rows or any(r is None for r in rows):
        return None
    steps = {b - a for a, b in zip(rows, rows[1:])}  # type: ignore[operator]
    if len(steps) <= 1 and min(steps, default=1) > 0:
        step = steps.pop() if steps else 1
        return slice(rows[0], rows[-1] + 1, step)  # type: ignore[operator]
    return np.array(rows)
