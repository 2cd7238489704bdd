"""Zero gradients, sign flips and update sizes between consecutive steps (SPEC §5 `optim_dynamics`),
keeping only sign and zero bits of g_{t−1}: on the CPU one code byte per element, read and written
by one fused pass (netprobe.native.step); elsewhere flat 0/±1 buffers reduced by PyTorch kernels."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from netprobe.errors import ConfigError
from netprobe.native import Block, HostBlocks
from netprobe.native import step as native_step
from netprobe.probes.base import Probe, ProbeContext, StepState, trained_positions
from netprobe.probes.options import Option
from netprobe.probes.reductions import device_sizes, stat_dtype
from netprobe.probes.schedule import Schedule
from netprobe.probes.segments import Segments

GRAD_METRICS = [
    "zero_frac_1e7",
    "zero_frac",
    "released_frac",
    "retained_frac",
    "flip_frac",
    "flip_frac_all",
]
UPDATE_METRICS = ["wdiff_l2", "wdiff_retained", "local_min", "local_max"]
METRICS = GRAD_METRICS + UPDATE_METRICS
# Without a previous gradient only these are defined (the first step, or after a gap).
UNPAIRED_METRICS = ["zero_frac_1e7", "zero_frac", "wdiff_l2"]


def gradient_dynamics(
    g: torch.Tensor,
    z: torch.Tensor,
    prev: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    retained: torch.Tensor,
    segments: Segments,
    zero_threshold: float = 1e-5,
    tiny_threshold: float = 1e-7,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradient-side metrics per segment of the flat sign g = sign(g_t) and magnitude z = |g_t|
    (`flat_sign_abs`), given prev = (sign g_{t−1}, z_{t−1}, #z_{t−1} per segment).

    With z_t = |g_t| ≤ 1e-5: `zero_frac_1e7` = #(|g_t| ≤ 1e-7)/numel; `zero_frac` = #z_t/numel;
    `released_frac` = #(z_{t−1} ∧ ¬z_t)/max(#z_{t−1}, 1); `retained_frac` = #(z_{t−1} ∧ z_t)/
    max(#z_{t−1}, 1); `flip_frac` = #(retained ∧ g_{t−1}g_t < 0)/max(#retained, 1);
    `flip_frac_all` = #(g_{t−1}g_t < 0)/numel.

    In place, every buffer flat and 0/±1 valued: z receives z_t, `retained` receives
    z_{t−1} ∧ z_t, and prev's buffers are spent: the first becomes scratch, the second ±1 on
    retained flips with the sign of g_t (which, across a flip, is the sign of g_t − g_{t−1}).
    Returns the [L, 6] metrics (only the first two columns without prev), #z_t and #retained per
    segment.
    """
    dtype = g.dtype
    numel = device_sizes(tuple(segments.sizes), g.device, dtype)
    n_tiny = segments.count(torch.le(z, tiny_threshold, out=retained))
    n_zero = segments.count(torch.le(z, zero_threshold, out=z))
    if prev is None:
        return torch.stack([n_tiny / numel, n_zero / numel], dim=1), n_zero, None
    s_prev, z_prev, n_prev = prev
    n_retained = segments.count(torch.mul(z_prev, z, out=retained))
    flipped = torch.lt(s_prev.mul_(g), 0, out=z_prev)
    n_flip = segments.count(flipped)
    n_flip_retained = segments.count(flipped.mul_(retained))
    flipped.mul_(g)
    # Counts over their denominators in one division: a small model's step pays per kernel.
    counts = torch.stack(
        [n_tiny, n_zero, n_prev - n_retained, n_retained, n_flip_retained, n_flip], 1
    )
    some_prev, some_retained = n_prev.clamp(min=1), n_retained.clamp(min=1)
    metrics = counts / torch.stack([numel, numel, some_prev, some_prev, some_retained, numel], 1)
    return metrics, n_zero, n_retained


def flat_sign_abs(
    tensors: list[torch.Tensor | None], segments: Segments, sign: torch.Tensor, size: torch.Tensor
) -> None:
    """sign(t) and |t| of each tensor (None: zeros) written into its segment of the flat buffers
    `sign` and `size`, straight from the tensors: no flat copy of the values is made first.
    Signs, not products g_{t−1}·g_t, are compared later: two tiny opposite gradients cannot
    underflow to 0."""
    for t, s, m in zip(tensors, segments.parts(sign), segments.parts(size)):
        if t is None:
            s.zero_()
            m.zero_()
            continue
        t = t.reshape(-1)
        if t.dtype == sign.dtype:
            torch.sign(t, out=s)
            torch.abs(t, out=m)
        else:  # low precision: converted first, the statistics being in float32
            s.copy_(t).sign_()
            m.copy_(t).abs_()


def update_dynamics(
    dw: torch.Tensor,
    scratch: torch.Tensor,
    retained: torch.Tensor | None,
    flips: torch.Tensor | None,
    n_retained: torch.Tensor | None,
    segments: Segments,
) -> torch.Tensor:
    """Update-side metrics per segment of dw = W_t − W_{t−1}, with `retained` and `flips` (±1 on
    retained flips, the sign of g_t − g_{t−1}) from gradient_dynamics.

    `wdiff_l2` = ‖W_t − W_{t−1}‖₂; `wdiff_retained` = mean |W_t − W_{t−1}| over retained (0 when
    none, like the SPEC's max(#, 1) fractions); `local_min` / `local_max` = #(flipped ∧ retained ∧
    (W_t−W_{t−1})(g_t−g_{t−1}) > 0 / < 0). Returns [L, 4], or [L, 1] (`wdiff_l2`) without
    `flips`. Spends every buffer it is given.
    """
    wdiff_l2 = segments.norm(dw)
    if retained is None or flips is None or n_retained is None:
        return wdiff_l2[:, None]
    # c = sign((W_t−W_{t−1})(g_t−g_{t−1})) on retained flips, else 0: with Σc and Σc² = #(c ≠ 0),
    # local_min = #(c = 1) = (Σc² + Σc)/2 and local_max = (Σc² − Σc)/2, from two reads of c.
    curvature = torch.sign(dw, out=scratch).mul_(flips)
    moving, net = segments.count_squares(curvature), segments.sum(curvature)
    local_min, local_max = (moving + net) / 2, (moving - net) / 2
    moved = segments.sum(dw.abs_().mul_(retained))
    mean_moved = moved / torch.clamp(n_retained, min=1)
    return torch.stack([wdiff_l2, mean_moved, local_min, local_max], dim=1)


# `sign_map` codes: 0 exact zero, ±1 small positive / negative, 2 large; NaN for a non-finite g.
SIGN_LARGE = 2.0


def sign_codes(g: torch.Tensor, zero_threshold: float = 1e-5) -> torch.Tensor:
    """0 where g = 0, +1 where 0 < g ≤ 1e-5, −1 where −1e-5 ≤ g < 0, 2 where |g| > 1e-5 (NaN
    where g is not finite), as float32 (`sign_map`)."""
    codes = torch.where(g.abs() > zero_threshold, SIGN_LARGE, g.sign())
    return torch.where(torch.isfinite(g), codes, torch.nan).to(torch.float32)


class TorchBuffers:
    """The PyTorch path's state: flat buffers allocated at the first read, of g_t (then sign g_t)
    and z_t of this step and the step before (they swap roles each step), z_{t−1} ∧ z_t and
    W_{t−1}, and the per-tensor counts that carry from one call to the next."""

    def __init__(self, segments: Segments, tensors: list[torch.Tensor], index: torch.Tensor):
        self.segments = segments
        dtype, device = stat_dtype(tensors), tensors[0].device
        keys = ("g", "z", "s_prev", "z_prev", "retained", "w_prev")
        self.b = {key: segments.buffer(dtype, device) for key in keys}
        self.index = index.to(device)  # the sign map's entries, flat
        self.n_prev: torch.Tensor | None = None  # #z_{t−1} per tensor while kept
        self.n_zero: torch.Tensor | None = None  # #z_t per tensor
        self.n_retained: torch.Tensor | None = None

    @property
    def kept(self) -> bool:
        return self.n_prev is not None

    def keep(self) -> None:
        self.n_prev, self.n_zero = self.n_zero, None

    def read(
        self, grads: native_step.Grads, compare: bool, thresholds, sample: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """gradient_dynamics of this step's gradient (against the kept step before's with
        `compare`), and with `sample` the sign map's entries of it; afterwards this step's sign
        and z sit where `keep` keeps them from, and the spent buffers of the step before serve
        this step's update and the next gradient."""
        b = self.b
        g, z = b["g"], b["z"]
        # A parameter without a gradient this step (unused in the forward) counts as all zeros.
        flat_sign_abs([p.grad for p in grads.params], self.segments, g, z)
        # sign · magnitude: exactly the values read
        values = (
            g.index_select(0, self.index).mul_(z.index_select(0, self.index)) if sample else None
        )
        prev = (b["s_prev"], b["z_prev"], self.n_prev) if compare else None
        metrics, self.n_zero, self.n_retained = gradient_dynamics(
            g, z, prev, b["retained"], self.segments, *thresholds
        )
        self.n_prev = None  # spent
        b["g"], b["s_prev"], b["z"], b["z_prev"] = b["s_prev"], g, b["z_prev"], b["z"]
        return metrics, values

    def snapshot(self, params: Sequence[torch.Tensor], step: int) -> None:
        """W_{t−1}: the weights step t starts from."""
        with torch.no_grad():
            torch.cat([p.reshape(-1) for p in params], out=self.b["w_prev"])

    def update(
        self, params: Sequence[torch.Tensor], compare: bool, metrics: torch.Tensor, step: int
    ) -> torch.Tensor:
        """The step's record: `metrics` and update_dynamics of W_t − W_{t−1}."""
        b = self.b
        # After the swap in `read`: "g" holds spent scratch, "z" the retained flips.
        # W_t − W_{t−1} tensor by tensor into the spent buffer: one pass, no flat copy of W_t.
        dw = b["g"]
        with torch.no_grad():
            parts = self.segments.parts
            for p, d, w in zip(params, parts(dw), parts(b["w_prev"])):
                torch.sub(p.reshape(-1), w, out=d)
        update = update_dynamics(
            *(dw, b["w_prev"], b["retained"] if compare else None, b["z"] if compare else None),
            *(self.n_retained, self.segments),
        )
        return torch.cat([metrics, update.to(metrics.dtype)], dim=1)

    def saved(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.b["s_prev"].to(torch.int8), self.b["z_prev"].to(torch.int8)

    def restore(self, s_prev: torch.Tensor, z_prev: torch.Tensor) -> None:
        self.b["s_prev"].copy_(s_prev)
        self.b["z_prev"].copy_(z_prev)
        self.n_prev = self.segments.count(self.b["z_prev"])


class FusedCodes:
    """The fused path's state (native_step.Dynamics): one code byte per tracked element and
    W_{t−1}, which each update leaves holding W_t: the weights the next step starts from, unless
    other steps come between or the weights were changed in place since (their version counters
    tell), when it is read again."""

    def __init__(
        self, kernels: native_step.StepKernels, params: list[torch.Tensor], sample: torch.Tensor
    ) -> None:
        self.params = params
        self.dynamics = native_step.Dynamics(kernels, sample)  # sample: the sign map's entries
        self.codes, self.w_prev = self.dynamics.codes, self.dynamics.w_prev
        self.kept = False
        # The step whose starting weights w_prev holds, if the weights' versions have not moved
        # since (Dynamics.changed).
        self._w_prev_of: int | None = None
        self._zeros: dict[int, torch.Tensor] = {}  # an absent gradient's stand-in
        # Each step's record, by whether it compares with the step before.
        self._blocks = {
            compare: HostBlocks(len(params), len(METRICS if compare else UNPAIRED_METRICS))
            for compare in (False, True)
        }

    def keep(self) -> None:
        self.kept = True

    def read(
        self,
        grads: native_step.Grads | native_step.Read,
        compare: bool,
        thresholds,
        sample: bool,
    ) -> tuple[Block, torch.Tensor | None]:
        """As TorchBuffers.read, in one pass, from the gradients or the monitor's read of them;
        the record's update columns are left to `update`."""
        metrics = self._blocks[compare].next()
        try:
            values = self.dynamics.grad(grads, compare, *thresholds, metrics, sample)
        except native_step.MissingGrad:
            # A parameter without a gradient this step (unused in the forward) reads as zeros.
            zeros = self._zeros
            present = [
                g if (g := p.grad) is not None else zeros.setdefault(i, torch.zeros_like(p))
                for i, p in enumerate(self.params)
            ]
            values = self.dynamics.grad(present, compare, *thresholds, metrics, sample)
        self.kept = False  # the codes now hold this step's sign and z
        return metrics, values

    def snapshot(self, params: Sequence[torch.Tensor], step: int) -> None:
        if self.dynamics.changed(params) or self._w_prev_of != step:
            with torch.no_grad():
                torch.cat([p.reshape(-1) for p in params], out=self.w_prev)

    def update(
        self, params: Sequence[torch.Tensor], compare: bool, metrics: Block, step: int
    ) -> np.ndarray:
        """Fills the update columns of `metrics` (the grad columns came from `read`)."""
        column = len(GRAD_METRICS) if compare else 2
        self.dynamics.update(params, compare, metrics, column)
        self.dynamics.changed(params)  # the versions W_t has
        self._w_prev_of = step + 1
        return metrics.array

    def saved(self) -> tuple[torch.Tensor, torch.Tensor]:
        codes = self.codes.to(torch.int8)
        return (codes & 1) - ((codes >> 1) & 1), (codes >> 2) & 1

    def restore(self, s_prev: torch.Tensor, z_prev: torch.Tensor) -> None:
        s_prev, z_prev = s_prev.to(self.codes.device), z_prev.to(self.codes.device)
        codes = (s_prev > 0).to(torch.uint8) | (s_prev < 0).to(torch.uint8) << 1
        self.codes.copy_(codes | (z_prev != 0).to(torch.uint8) << 2)
        self.kept = True


class OptimDynamics(Probe):
    """Every step: zero-gradient, sign-flip and update statistics; each epoch: the `sign_map`.

    g_t is the gradient read in `after_backward` of step t; W_{t−1} is snapshotted there (the
    weights step t starts from; on the fused path, kept from the update of step t − 1 when that
    was recorded) and W_t read in `after_step`, so W_t − W_{t−1} is exactly the update made with
    g_t. Of g_{t−1} only sign(g_{t−1}) and z_{t−1} are kept.
    """

    name = "optim_dynamics"
    measures = "zero-gradient, sign-flip and update statistics per tensor; the epoch's sign_map"
    # Each record compares a step with the step before, whose sign and z `arm` keeps.
    default_schedule = Schedule(every=1, at=("epoch",), arm=True)
    options = (
        Option("zero_threshold", float, 1e-5, low=0),
        Option("tiny_threshold", float, 1e-7, low=0),
        Option("sign_samples", int, 64, low=1),
        Option("sign_rows", int, 32, low=1),
    )

    def __init__(self, ctx: ProbeContext, **cfg: Any) -> None:
        super().__init__(ctx, **cfg)
        if self.schedule.every is None:
            raise ConfigError(
                f"probes.{self.name}.every must be a number of steps: each record compares a "
                "step's gradient with the step before"
            )
        k = self.cfg["sign_samples"]
        self.params = self.select_dense_grads()
        self.names = [n for n, _ in self.params]
        self.tensors = [p for _, p in self.params]
        self._grads = native_step.Grads(tuple(self.tensors))
        self.sizes = [p.numel() for p in self.tensors]
        self.sign_index, self.sign_sizes, self._sign_at = self._draw_sign_indices(k)
        self.segments = Segments(self.sizes)
        self._kernels = native_step.kernels(self.tensors)
        # On the fused path, where every tracked tensor is trained, the gradients are read from
        # the monitor's read of them (StepState.grad_read) where it has one.
        at = trained_positions(ctx.model, self.tensors)
        self._reads_monitors = self._kernels is not None and None not in at
        if self._reads_monitors:
            self._kernels.picks = at  # type: ignore[union-attr]
        self._thresholds = (self.cfg["zero_threshold"], self.cfg["tiny_threshold"])
        # TorchBuffers or FusedCodes, made at the first gradient read (or restore).
        self._state: TorchBuffers | FusedCodes | None = None
        self._read_step: int | None = None  # the step whose gradient was read last
        # The gradient metrics of the recorded step under way and whether they compare with the
        # step before: recorded with the update in `after_step`.
        self._pending: tuple[torch.Tensor | Block, bool] | None = None
        # The epoch's sampled gradients (step, [Σ K]) for the sign map: every `_sign_stride`-th
        # step, thinned to every other one whenever they reach 4 · sign_rows.
        self._sign_rows: list[tuple[int, torch.Tensor]] = []
        self._sign_seen, self._sign_stride = 0, 1

    def _draw_sign_indices(self, k: int) -> tuple[torch.Tensor, list[int], torch.Tensor]:
        """K flat positions per tensor (all of a smaller one), drawn once from the run's seed;
        their sizes per tensor; and each as [tensor, offset in it]."""
        gen = self.ctx.generator(salt=0x5167)
        picks, sizes, at, offset = [], [], [], 0
        for i, n in enumerate(self.sizes):
            idx = torch.arange(n) if n <= k else torch.randperm(n, generator=gen)[:k].sort().values
            picks.append(idx + offset)
            sizes.append(len(idx))
            at.append(torch.stack([torch.full_like(idx, i), idx]))
            offset += n
        if not picks:
            return torch.zeros(0, dtype=torch.long), sizes, torch.zeros((2, 0), dtype=torch.long)
        return torch.cat(picks), sizes, torch.cat(at, dim=1)

    def _held(self) -> TorchBuffers | FusedCodes:
        if self._state is None:
            if self._kernels is not None:
                self._state = FusedCodes(self._kernels, self.tensors, self._sign_at)
            else:
                self._state = TorchBuffers(self.segments, self.tensors, self.sign_index)
        return self._state

    def _read(
        self, held: TorchBuffers | FusedCodes, state: StepState, compare: bool
    ) -> torch.Tensor | Block:
        """This step's gradient metrics (against the kept step before's if `compare`), and every
        `_sign_stride`-th step's sampled gradients for the sign map."""
        sample = self._sign_seen % self._sign_stride == 0
        read = state.grad_read
        grads = read if read is not None and self._reads_monitors else self._grads
        try:
            metrics, values = held.read(grads, compare, self._thresholds, sample)
        except (native_step.Unreadable, RuntimeError) as exc:
            self.failed_read(self.params, exc)
        if values is not None:
            self._sign_rows.append((state.step, values))
            if len(self._sign_rows) >= 4 * self.cfg["sign_rows"]:
                self._sign_rows, self._sign_stride = self._sign_rows[::2], 2 * self._sign_stride
        self._sign_seen += 1
        self._read_step = state.step
        return metrics

    def after_backward(self, state: StepState) -> None:
        if not self.params:
            return
        held = self._held()
        compare = held.kept  # `arm` kept the step before's sign and z
        self._pending = (self._read(held, state, compare), compare)
        held.snapshot(self.tensors, state.step)

    def arm(self, state: StepState) -> None:
        """Keeps this step's sign(g) and z for the next step, which is recorded."""
        if state.loss is None or not self.params:
            return  # before this process's first backward: nothing to keep (or restored)
        held = self._held()
        if self._read_step != state.step:  # this step is not recorded: its gradient is unread
            self._read(held, state, compare=False)
        held.keep()

    def after_step(self, state: StepState) -> None:
        self._read_step = None  # the next step's gradient is another one
        if self._pending is None:
            return
        metrics, compared = self._pending
        self._pending = None
        values = self._held().update(self.tensors, compared, metrics, state.step)
        self.ctx.record.scalars(
            self.name, self.names, METRICS if compared else UNPAIRED_METRICS, values
        )

    def state_dict(self) -> dict[str, Any]:
        """sign(g_{t−1}) and z_{t−1} as int8 when kept for the coming step, so that its record
        compares with the step before; W_{t−1} is refilled at the next recorded step, and the
        sign rows are written at each epoch's end."""
        kept = self._state is not None and self._state.kept
        s_prev, z_prev = self._state.saved() if kept else (None, None)  # type: ignore[union-attr]
        return {**super().state_dict(), "s_prev": s_prev, "z_prev": z_prev}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        device = self.tensors[0].device if self.tensors else torch.device("cpu")
        if state.get("g_prev") is not None:  # saved by an earlier version: the gradient itself
            g_prev = state["g_prev"].to(device)
            zero = g_prev.abs() <= self.cfg["zero_threshold"]
            state = {**state, "s_prev": g_prev.sign(), "z_prev": zero}
        if state.get("s_prev") is None or not self.tensors:
            return
        self._held().restore(state["s_prev"].to(device), state["z_prev"].to(device))

    def capture(self, state: StepState) -> None:
        """The sign codes of the K sampled gradients at up to `sign_rows` evenly spaced steps of
        the epoch: per tensor a [steps, K] matrix `sign_map`, and the steps in `sign_steps`."""
        rows, n = self._sign_rows, self.cfg["sign_rows"]
        self._sign_rows, self._sign_seen, self._sign_stride = [], 0, 1
        if not rows:
            return
        if len(rows) > n:
            rows = [
                rows[i]
                for i in sorted({round(i * (len(rows) - 1) / (n - 1 or 1)) for i in range(n)})
            ]
        steps = torch.tensor([step for step, _ in rows], dtype=torch.float32)
        codes = sign_codes(torch.stack([g for _, g in rows]), self.cfg["zero_threshold"])
        self.ctx.record.matrix(self.name, "sign_steps", "", "", steps)
        for name, block in zip(self.names, codes.split(self.sign_sizes, dim=1)):
            self.ctx.record.matrix(self.name, "sign_map", name, "", block)
