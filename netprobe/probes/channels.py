"""How much gradient each conv channel sends back and receives (SPEC §5 `channels`): emission
and absorption per channel of each tracked Conv2d, from one extra backward on the probe batch."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from netprobe.errors import ConfigError
from netprobe.probes.base import Probe, ProbeContext, StepState
from netprobe.probes.capture import module_outputs
from netprobe.probes.options import Option
from netprobe.probes.reductions import to_float64
from netprobe.probes.schedule import Schedule

METRICS = ["em_mean", "em_std", "ab_mean", "ab_std"]


def is_tracked_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups == 1


def transpose_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """The conv's padding as two ints: `valid` is 0; `same` pads d(k−1) in total, the smaller half
    first (what PyTorch does), so that half is what the transpose crops."""
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        return tuple(d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size))
    return tuple(conv.padding)


def tap_reach(
    tap: int, size_out: int, size_in: int, stride: int, padding: int, dilation: int
) -> tuple[slice, slice] | None:
    """Along one dimension, the outputs o that kernel tap `tap` carries back to an input
    i = o·s + tap·d − p inside [0, size_in), and those inputs, as (slice of o, slice of i);
    None when it carries none there."""
    first = max(0, -(-(padding - tap * dilation) // stride))  # ⌈(p − tap·d)/s⌉
    last = min(size_out - 1, (size_in - 1 + padding - tap * dilation) // stride)
    if last < first:
        return None
    start = first * stride + tap * dilation - padding
    return slice(first, last + 1), slice(start, start + (last - first) * stride + 1, stride)


def spread_gradients(
    g: torch.Tensor,
    kernel_size: tuple[int, int],
    input_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """U [C, k·k, B, H_in, W_in]: U[c, κ] = conv_transpose2d(g[:, c], e_κ), the output gradient
    of channel c placed where kernel tap κ carries it back to the input (`tap_reach`), 0 where
    it carries nothing. Written into `out` when given (zeros where no tap reaches, as a buffer
    already used for the same geometry is), in its dtype.

    Then LG^{c1→c2} = Σ_κ W[c1, c2, κ] U[c1, κ], since conv_transpose2d is linear in the kernel.
    The values are copies of g (strided copies, no convolution), exact in any precision.
    """
    b, c, h_out, w_out = g.shape
    kh, kw = kernel_size
    u = g.new_zeros(c, kh * kw, b, *input_size) if out is None else out
    by_channel = g.transpose(0, 1)
    for th in range(kh):
        rows = tap_reach(th, h_out, input_size[0], stride[0], padding[0], dilation[0])
        for tw in range(kw):
            cols = tap_reach(tw, w_out, input_size[1], stride[1], padding[1], dilation[1])
            if rows is not None and cols is not None:
                u[:, th * kw + tw, :, rows[1], cols[1]] = by_channel[:, :, rows[0], cols[0]]
    return u


def channel_pair_norms(
    g: torch.Tensor,
    weight: torch.Tensor,
    input_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    chunk: int = 16,
) -> torch.Tensor:
    """‖LG^{c1→c2}‖_F for every pair, [C_out, C_in] (float64), with g = ∂L/∂y [B, C_out, H_out,
    W_out] and LG^{c1→c2} = conv_transpose2d(g[:, c1], W[c1, c2]) (the conv's stride, padding and
    dilation): the gradient output channel c1 sends to input channel c2, as Σ_{c1} LG^{c1→c2} is
    ∂L/∂x[:, c2].

    Output channels go `chunk` at a time, through U (`spread_gradients`). With few input
    channels (C_in ≤ k²) each block's maps LG^{c1→c2} = W[c1, c2] U_{c1} are made outright, by
    one batched matrix product. With more, no map is made per pair: with w = W[c1, c2]
    flattened, ‖LG^{c1→c2}‖²_F = wᵀ A_{c1} w with the k² × k² Gram matrix A_{c1} = U_{c1} U_{c1}ᵀ
    (float64) summed over batch and space, one per output channel for all its pairs.
    """
    c_out, c_in, kh, kw = weight.shape
    taps = kh * kw
    gram_path = c_in > taps
    # One buffer for every block: each block writes the same places, the rest stays 0.
    dtype = torch.float64 if gram_path else g.dtype
    u = g.new_zeros(min(chunk, c_out), taps, g.shape[0], *input_size, dtype=dtype)
    flat_w = weight.reshape(c_out, c_in, taps)
    squares = []
    for a in range(0, c_out, chunk):
        n = min(chunk, c_out - a)
        spread = spread_gradients(
            g[:, a : a + n], (kh, kw), input_size, stride, padding, dilation, out=u[:n]
        ).view(n, taps, -1)
        pair_w = flat_w[a : a + n]
        if not gram_path:
            lg = pair_w.to(dtype) @ spread  # [n, C_in, B·H·W]
            squares.append(torch.linalg.vector_norm(lg, dim=-1, dtype=torch.float64).square())
        else:
            gram = spread @ spread.transpose(1, 2)
            pair_w = to_float64(pair_w)
            squares.append(((pair_w @ gram) * pair_w).sum(dim=-1))  # wᵀ A w per (c1, c2)
    return torch.cat(squares).clamp(min=0).sqrt()


def emission_absorption(norms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Em_{c1} = Σ_{c2} ‖LG^{c1→c2}‖_F and Ab_{c2} = Σ_{c1} ‖LG^{c1→c2}‖_F from [C_out, C_in]."""
    return norms.sum(dim=1), norms.sum(dim=0)


class Channels(Probe):
    """At the end (or each epoch): per-channel gradient emission and absorption of each conv."""

    name = "channels"
    measures = "per-channel gradient emission and absorption of each conv (its own backward)"
    default_schedule = Schedule(at=("end",))
    options = (Option("chunk", int, 16, low=1),)

    def __init__(self, ctx: ProbeContext, **cfg: Any) -> None:
        super().__init__(ctx, **cfg)
        model = ctx.model
        chosen = self.select_modules(lambda r: is_tracked_conv(model.get_submodule(r.module)))
        self.modules = [(n, m) for n, m in chosen if is_tracked_conv(m)]
        if self.patterns and not self.modules:
            convs = [n for n, m in model.named_modules() if is_tracked_conv(m)]
            raise ConfigError(
                f"probes.{self.name}.layers {self.patterns} select no Conv2d with groups=1; "
                f"those are: {', '.join(convs) or 'none in this model'}"
            )

    def memory_estimate(self) -> tuple[int, str]:
        """The probe batch's forward graph (every module output, float32), ∂L/∂y of each
        tracked conv, and the largest block of `chunk` output channels, per chunk × B × H_in ×
        W_in (H_in ≈ H_out × stride): U in float64 (8 k² bytes) on the Gram path, else U in
        float32 and the maps in float32 and float64 (4 k² + 12 C_in bytes)."""
        if self.ctx.probe_batch is None or not self.modules:
            return 0, ""
        b = len(self.ctx.probe_batch[0])
        shapes = self.module_shapes()
        graph = 4 * b * sum(r.numel for r in self.ctx.layers if not r.param)
        grads, block = 0, 0
        for name, conv in self.modules:
            shape = shapes.get(name, ())
            if len(shape) != 3:
                continue
            c_out, h, w = shape
            grads += 4 * b * c_out * h * w
            taps, c_in = conv.kernel_size[0] * conv.kernel_size[1], conv.in_channels
            per_value = 8 * taps if c_in > taps else 4 * taps + 12 * c_in
            size = h * conv.stride[0] * w * conv.stride[1]
            block = max(block, per_value * min(self.cfg["chunk"], c_out) * b * size)
        lower = f"probes.{self.name}.chunk" if block >= graph + grads else "data.probe_size"
        return graph + grads + block, lower

    def output_gradients(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Size]]:
        """g = ∂L/∂y of each tracked conv on the probe batch (one forward and backward in eval
        mode; `.grad` of the parameters is not touched), and the shape of its input."""
        x, y = self.ctx.probe_batch
        outs = module_outputs(self.ctx.model, self.modules, x, grad=True)
        names = [n for n, _ in self.modules if n in outs.values and outs.values[n].requires_grad]
        if not names:
            return {}, {}
        loss = self.ctx.loss_fn(outs.output, y)
        grads = torch.autograd.grad(loss, [outs.values[n] for n in names], allow_unused=True)
        found = {n: g for n, g in zip(names, grads) if g is not None}
        return found, outs.input_shapes

    def capture(self, state: StepState) -> None:
        """Per conv, the matrices `emission` [C_out] and `absorption` [C_in] (row = the conv), and
        scalars `em_mean`, `em_std`, `ab_mean`, `ab_std` (population std over channels)."""
        if self.ctx.probe_batch is None or not self.modules:
            return
        grads, shapes = self.output_gradients()
        names, stats = [], []
        for name, conv in self.modules:
            if name not in grads:
                continue
            with torch.no_grad():
                norms = channel_pair_norms(
                    grads[name],
                    conv.weight.detach(),
                    tuple(shapes[name][-2:]),
                    conv.stride,
                    transpose_padding(conv),
                    conv.dilation,
                    self.cfg["chunk"],
                )
            em, ab = emission_absorption(norms)
            self.ctx.record.matrix(self.name, "emission", name, "", em)
            self.ctx.record.matrix(self.name, "absorption", name, "", ab)
            names.append(name)
            stats.append(
                torch.stack([em.mean(), em.std(correction=0), ab.mean(), ab.std(correction=0)])
            )
        if names:
            self.ctx.record.scalars(self.name, names, METRICS, torch.stack(stats))
