"""Per-layer gradient statistics, every step by default (SPEC §5 `gradients`)."""

from __future__ import annotations

import functools

import torch

from netprobe.probes.base import Probe

METRICS = ["l1", "l2", "mean_abs", "max_abs", "nonfinite"]


def stat_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    """float64 for float64 tensors, else float32: statistics of low-precision tensors in float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


@functools.lru_cache(maxsize=64)
def device_sizes(
    sizes: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.int64
) -> torch.Tensor:
    """`sizes` as a tensor on `device`, made once per device and set of tensors: a per-step
    torch.tensor(...) would be a blocking host-to-device copy every step."""
    return torch.tensor(sizes, dtype=dtype, device=device)


def gradient_stats(grads: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tensor [l1 = Σ|g|, l2 = √Σg², mean_abs = l1/numel, max_abs = max|g|,
    nonfinite = #(g is NaN or ±inf)], and ‖g‖₂ overall.

    Fused multi-tensor kernels for the norms; nothing leaves the device. Half-precision gradients
    are summed in float32 (a bf16 sum over a large tensor keeps ~3 significant digits).
    """
    dtype = stat_dtype(grads)
    l1 = torch.stack(torch._foreach_norm(grads, 1, dtype=dtype))
    l2 = torch.stack(torch._foreach_norm(grads, 2, dtype=dtype))
    max_abs = torch.stack(torch._foreach_norm(grads, float("inf"), dtype=dtype))
    sizes = device_sizes(tuple(g.numel() for g in grads), l1.device)
    # Counted in int64, so a few bad entries in a huge tensor are not lost to float rounding.
    nonfinite = sizes - torch.stack([torch.isfinite(g).sum() for g in grads])
    return (
        torch.stack([l1, l2, l1 / sizes.to(l1.dtype), max_abs, nonfinite.to(l1.dtype)], dim=1),
        torch.linalg.vector_norm(l2),
    )


class Gradients(Probe):
    name = "gradients"
    default_every = 1

    def __init__(self, ctx, **cfg) -> None:
        super().__init__(ctx, **cfg)
        self.params = self.select_params()
        self.names = [n for n, _ in self.params]

    def after_backward(self) -> None:
        if not self.due():
            return
        with_grad = [(n, p.grad) for n, p in self.params if p.grad is not None]
        if not with_grad:
            return
        names = self.names if len(with_grad) == len(self.params) else [n for n, _ in with_grad]
        per_tensor, _ = gradient_stats([g for _, g in with_grad])
        self.ctx.record.scalars(self.name, names, METRICS, per_tensor)
        # Model-wide, biases and norm layers included: the monitor's norm for the training curve.
        total = self.ctx.grad_l2_total
        if total is not None:
            self.ctx.record.scalars(self.name, [""], ["grad_l2_total"], total.reshape(1, 1))
