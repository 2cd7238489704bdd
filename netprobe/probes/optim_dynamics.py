"""Zero gradients, sign flips and update sizes between consecutive steps (SPEC §5 `optim_dynamics`).

Time indexing: g_t is the gradient read in `after_backward` of step t. W_{t−1} is snapshotted in the
same `after_backward` (the weights step t starts from; in a plain loop that is the weight after
step t−1) and W_t is read in `after_step`, so W_t − W_{t−1} is exactly the update made by the step
whose gradient is g_t, even if something else touched the weights between steps.

Memory: one flat copy of g_{t−1} and one of W_{t−1} on the device, nothing more. What the update
metrics need from the gradient side (retained, flipped, sign of g_t − g_{t−1}) crosses from
`after_backward` to `after_step` as one int8 code per element, dropped after the step.
"""

from __future__ import annotations

from typing import Any

import torch

from netprobe.errors import ConfigError
from netprobe.probes.base import Probe, ProbeContext
from netprobe.probes.gradients import device_sizes, stat_dtype

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
FIRST_METRICS = ["zero_frac_1e7", "zero_frac", "wdiff_l2"]

# Codes carried from after_backward to after_step, one per element.
NOT_RETAINED, RETAINED, FLIP_UP, FLIP_DOWN = 0, 1, 2, -2


def segment_sums(flat: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Σ over each consecutive segment of a non-negative flat tensor, as a [len(sizes)] tensor.

    For non-negative values Σx = ‖x‖₁, so one fused multi-tensor norm reduces every segment at once.
    """
    return torch.stack(torch._foreach_norm(list(flat.split(sizes)), 1))


def segment_counts(masks: list[torch.Tensor], sizes: list[int]) -> torch.Tensor:
    """#True in each consecutive segment of each flat bool mask, as [len(sizes), len(masks)] int64.

    The masks are stacked and each segment summed across all of them at once: a few kernels for
    every count of a step instead of a cast and a reduction per mask, and exact integer counts.
    """
    stacked = torch.stack(masks)
    return torch.stack([part.sum(dim=1, dtype=torch.int64) for part in stacked.split(sizes, dim=1)])


def gradient_dynamics(
    g: torch.Tensor,
    g_prev: torch.Tensor | None,
    sizes: list[int],
    zero_threshold: float = 1e-5,
    tiny_threshold: float = 1e-7,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradient-side metrics per segment of the flat gradients g = g_t and g_prev = g_{t−1}.

    With z_t = |g_t| ≤ 1e-5: `zero_frac_1e7` = #(|g_t| ≤ 1e-7)/numel; `zero_frac` = #z_t/numel;
    `released_frac` = #(z_{t−1} ∧ ¬z_t)/max(#z_{t−1}, 1); `retained_frac` = #(z_{t−1} ∧ z_t)/
    max(#z_{t−1}, 1); `flip_frac` = #(retained ∧ g_{t−1}g_t < 0)/max(#retained, 1);
    `flip_frac_all` = #(g_{t−1}g_t < 0)/numel.

    Returns the [L, 6] metrics (only the first two columns without g_prev), #retained per segment,
    and the int8 code per element for `update_dynamics`: 0 not retained, 1 retained, ±2 retained
    and flipped with the sign of g_t − g_{t−1} (which, across a flip, is the sign of g_t).
    """
    dtype = stat_dtype([g])  # not half precision: counts would be wrong beyond a few thousand
    numel = device_sizes(tuple(sizes), g.device, dtype)
    a = g.abs()
    tiny, z = a <= tiny_threshold, a <= zero_threshold
    if g_prev is None:
        counts = segment_counts([tiny, z], sizes).to(dtype)
        return counts / numel[:, None], None, None
    z_prev = g_prev.abs() <= zero_threshold
    # Signs, not the product g_{t−1}·g_t, so that two tiny opposite gradients cannot underflow to 0.
    flipped = (g * g_prev.sign()) < 0
    retained = z_prev & z
    flipped_retained = retained & flipped
    counts = segment_counts([tiny, z, z_prev, retained, flipped_retained, flipped], sizes)
    n_tiny, n_zero, n_prev, n_retained, n_flip_retained, n_flip = counts.to(dtype).unbind(1)
    one = torch.ones((), dtype=dtype, device=g.device)
    metrics = torch.stack(
        [
            n_tiny / numel,
            n_zero / numel,
            (n_prev - n_retained) / torch.maximum(n_prev, one),
            n_retained / torch.maximum(n_prev, one),
            n_flip_retained / torch.maximum(n_retained, one),
            n_flip / numel,
        ],
        dim=1,
    )
    # RETAINED where retained, then FLIP_UP·sign(g) where also flipped: 1 + (2·sign − 1) = ±2.
    # Sums of masks rather than torch.where, which is several times slower on CPUs.
    up, down = (
        (flipped_retained & (g > 0)).to(torch.int8),
        (flipped_retained & (g < 0)).to(torch.int8),
    )
    code = retained.to(torch.int8) * RETAINED + up - 3 * down
    return metrics, n_retained, code


def update_dynamics(
    dw: torch.Tensor, code: torch.Tensor | None, n_retained: torch.Tensor | None, sizes: list[int]
) -> torch.Tensor:
    """Update-side metrics per segment of dw = W_t − W_{t−1}, with `code` from gradient_dynamics.

    `wdiff_l2` = ‖W_t − W_{t−1}‖₂; `wdiff_retained` = mean |W_t − W_{t−1}| over retained (0 when
    none, like the SPEC's max(#, 1) fractions); `local_min` / `local_max` = #(flipped ∧ retained ∧
    (W_t−W_{t−1})(g_t−g_{t−1}) > 0 / < 0). Returns [L, 4], or [L, 1] (`wdiff_l2`) without `code`.
    """
    dtype = stat_dtype([dw])
    dw = dw.to(dtype)
    wdiff_l2 = torch.stack(torch._foreach_norm(list(dw.split(sizes)), 2))
    if code is None or n_retained is None:
        return wdiff_l2[:, None]
    moved = segment_sums(dw.abs() * (code != NOT_RETAINED), sizes)
    # On flipped elements code = ±2 carries the sign of g_t − g_{t−1}: the product is positive
    # where dw has that sign. Bool masks, not arithmetic on the int8 codes (slow on CPUs).
    up, down, rises, falls = code == FLIP_UP, code == FLIP_DOWN, dw > 0, dw < 0
    counts = segment_counts([(up & rises) | (down & falls), (up & falls) | (down & rises)], sizes)
    local_min, local_max = counts.to(dtype).unbind(1)
    mean_moved = moved / torch.clamp(n_retained.to(dtype), min=1)
    return torch.stack([wdiff_l2, mean_moved, local_min, local_max], dim=1)


# `sign_map` codes: exact zero, small positive, small negative, large; NaN for a non-finite g.
SIGN_ZERO, SIGN_POSITIVE, SIGN_NEGATIVE, SIGN_LARGE = 0.0, 1.0, -1.0, 2.0


def sign_codes(g: torch.Tensor, zero_threshold: float = 1e-5) -> torch.Tensor:
    """0 where g = 0, +1 where 0 < g ≤ 1e-5, −1 where −1e-5 ≤ g < 0, 2 where |g| > 1e-5 (NaN
    where g is not finite), as float32 (`sign_map`)."""
    codes = torch.where(g.abs() > zero_threshold, SIGN_LARGE, g.sign())
    return torch.where(torch.isfinite(g), codes, torch.nan).to(torch.float32)


class OptimDynamics(Probe):
    """Every step: zero-gradient, sign-flip and update statistics; each epoch: the `sign_map`."""

    name = "optim_dynamics"
    default_every = 1
    default_at = ("epoch",)
    options = {"zero_threshold": 1e-5, "tiny_threshold": 1e-7, "sign_samples": 64, "sign_rows": 32}

    def __init__(self, ctx: ProbeContext, **cfg: Any) -> None:
        super().__init__(ctx, **cfg)
        if self.every is None:
            raise ConfigError(
                f"probes.{self.name}.every must be a number of steps: each record compares a "
                "step's gradient with the step before"
            )
        for key in ("zero_threshold", "tiny_threshold"):
            value = self.cfg[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"probes.{self.name}.{key}={value!r} must be a number ≥ 0")
        for key in ("sign_samples", "sign_rows"):
            k = self.cfg[key]
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ConfigError(f"probes.{self.name}.{key}={k!r} must be a positive integer")
        k = self.cfg["sign_samples"]
        self.params = self.select_params()
        self.names = [n for n, _ in self.params]
        self.tensors = [p for _, p in self.params]
        self.sizes = [p.numel() for p in self.tensors]
        self.sign_index, self.sign_sizes = self._draw_sign_indices(k)
        self._g_prev: torch.Tensor | None = None  # flat g_{t−1}
        self._g_step: int | None = None
        self._w_prev: torch.Tensor | None = None  # flat W_{t−1}, allocated once
        self._w_views: list[torch.Tensor] = []  # views of _w_prev shaped like the parameters
        self._w_step: int | None = None
        self._pending: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None = None
        # The epoch's sampled gradients (step, [Σ K]) for the sign map: every `_sign_stride`-th
        # step, thinned to every other one whenever they reach 4 · sign_rows.
        self._sign_rows: list[tuple[int, torch.Tensor]] = []
        self._sign_seen, self._sign_stride = 0, 1

    def _draw_sign_indices(self, k: int) -> tuple[torch.Tensor, list[int]]:
        """K flat positions per tensor (all of a smaller one), drawn once from the run's seed."""
        gen = self.ctx.generator(salt=0x5167)
        picks, sizes, offset = [], [], 0
        for n in self.sizes:
            idx = torch.arange(n) if n <= k else torch.randperm(n, generator=gen)[:k].sort().values
            picks.append(idx + offset)
            sizes.append(len(idx))
            offset += n
        return torch.cat(picks) if picks else torch.zeros(0, dtype=torch.long), sizes

    def _flat_grads(self) -> torch.Tensor:
        # A parameter without a gradient this step (unused in the forward) counts as all zeros.
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.tensors]
        return torch.cat([g.reshape(-1) for g in grads])

    def after_backward(self) -> None:
        if not self.params:
            return
        step = self.ctx.progress.step
        due, keep = self.due(step), self.due(step + 1)
        if not (due or keep):
            return
        g = self._flat_grads()
        if self.sign_index.device != g.device:
            self.sign_index = self.sign_index.to(g.device)
        if self._sign_seen % self._sign_stride == 0:
            self._sign_rows.append((step, g.index_select(0, self.sign_index)))
            if len(self._sign_rows) >= 4 * self.cfg["sign_rows"]:
                self._sign_rows, self._sign_stride = self._sign_rows[::2], 2 * self._sign_stride
        self._sign_seen += 1
        if due:
            g_prev = self._g_prev if self._g_step == step - 1 else None
            self._pending = gradient_dynamics(
                g, g_prev, self.sizes, self.cfg["zero_threshold"], self.cfg["tiny_threshold"]
            )
            if self._w_prev is None:
                first = self.tensors[0]
                self._w_prev = torch.empty(sum(self.sizes), dtype=first.dtype, device=first.device)
                self._w_views = [
                    v.view_as(p) for v, p in zip(self._w_prev.split(self.sizes), self.tensors)
                ]
            with torch.no_grad():
                torch._foreach_copy_(self._w_views, self.tensors)
            self._w_step = step
        # The old g_{t−1} is released here; g_t is kept only if the next step will need it.
        self._g_prev, self._g_step = (g, step) if keep else (None, None)

    def after_step(self) -> None:
        if self._w_step != self.ctx.progress.step or self._pending is None:
            return
        grad_metrics, n_retained, code = self._pending
        self._pending, self._w_step = None, None
        with torch.no_grad():
            # In place: the buffer becomes W_{t−1} − W_t, then W_t − W_{t−1}; refilled next step.
            torch._foreach_sub_(self._w_views, self.tensors)
            dw = self._w_prev.neg_()
        update = update_dynamics(dw, code, n_retained, self.sizes).to(grad_metrics.dtype)
        values = torch.cat([grad_metrics, update], dim=1)
        metrics = FIRST_METRICS if code is None else METRICS
        self.ctx.record.scalars(self.name, self.names, metrics, values)

    def state_dict(self) -> dict[str, Any]:
        """g_{t−1} (so the first step after resuming compares with the step before); W_{t−1} is
        refilled at every due step, and the sign rows are written at each epoch's end."""
        return {"g_prev": self._g_prev, "g_step": self._g_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.tensors[0].device if self.tensors else torch.device("cpu")
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        self._g_prev, self._g_step = move(state["g_prev"]), state["g_step"]

    def capture(self) -> None:
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
