"""How much gradient each conv channel sends back and receives (SPEC §5 `channels`): emission
and absorption per channel of each tracked Conv2d, from one extra backward on the probe batch."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

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


def _transpose(
    g: torch.Tensor,
    kernels: torch.Tensor,
    input_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> torch.Tensor:
    """conv_transpose2d of each channel of g [B, n, H_out, W_out] with its own kernels [n, m, k, k]
    (groups = n), at the conv's input size [B, n·m, H_in, W_in].

    output_padding restores the rows a strided conv never reached; for an asymmetric `same`
    padding the transpose comes out larger instead, and is cropped to the input size.
    """
    full = [
        (o - 1) * s - 2 * p + d * (k - 1) + 1
        for o, s, p, d, k in zip(g.shape[2:], stride, padding, dilation, kernels.shape[2:])
    ]
    extra = tuple(max(0, size - f) for size, f in zip(input_size, full))
    h, w = input_size
    return F.conv_transpose2d(
        g,
        kernels,
        stride=stride,
        padding=padding,
        output_padding=extra,
        groups=g.shape[1],
        dilation=dilation,
    )[:, :, :h, :w]


def spread_gradients(
    g: torch.Tensor,
    kernel_size: tuple[int, int],
    input_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> torch.Tensor:
    """U [B, C, k·k, H_in, W_in]: U[:, c, κ] = conv_transpose2d(g[:, c], e_κ), the output
    gradient of channel c placed where kernel tap κ carries it back to the input.

    Then LG^{c1→c2} = Σ_κ W[c1, c2, κ] U[:, c1, κ], since conv_transpose2d is linear in the kernel.
    With one-hot kernels the values are copies of g, exact in any precision.
    """
    b, c = g.shape[:2]
    kh, kw = kernel_size
    taps = kh * kw
    eye = torch.eye(taps, dtype=g.dtype, device=g.device).view(1, taps, kh, kw)
    u = _transpose(g, eye.expand(c, taps, kh, kw), input_size, stride, padding, dilation)
    return u.reshape(b, c, taps, *input_size)


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

    Output channels go `chunk` at a time. With few input channels (C_in ≤ k²) each block's maps
    LG^{c1→c2} are made outright, by one conv_transpose2d with groups = the block's channels.
    With more, no map is made per pair: LG^{c1→c2} = U_{c1} w with w = W[c1, c2] flattened (see
    `spread_gradients`), so ‖LG^{c1→c2}‖²_F = wᵀ A_{c1} w with the k² × k² Gram matrix
    A_{c1} = U_{c1}ᵀ U_{c1} summed over batch and space, one per output channel for all its pairs.
    Either way the memory is about chunk × min(C_in, k²) × B × H_in × W_in values.
    """
    c_out, c_in, kh, kw = weight.shape
    taps = kh * kw
    squares = []
    if c_in <= taps:
        for a in range(0, c_out, chunk):
            n = min(chunk, c_out - a)
            blocks = g[:, a : a + n], weight[a : a + n]
            lg = _transpose(*blocks, input_size, stride, padding, dilation)
            squares.append(to_float64(lg).square().sum(dim=(0, 2, 3)).view(n, c_in))
    else:
        flat_w = to_float64(weight.reshape(c_out, c_in, taps))
        for a in range(0, c_out, chunk):
            u = spread_gradients(
                g[:, a : a + chunk], (kh, kw), input_size, stride, padding, dilation
            )
            n = u.shape[1]
            # [n, k², B·H·W] in float64: the Gram sums run over every batch element and pixel
            u = to_float64(u.permute(1, 2, 0, 3, 4).reshape(n, taps, -1))
            gram = u @ u.transpose(1, 2)
            pair_w = flat_w[a : a + n]
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
        tracked conv, and the largest block of `chunk` output channels: chunk × min(C_in, k²) ×
        B × H_in × W_in values, in float32 and float64 (H_in ≈ H_out × stride)."""
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
            taps = min(conv.in_channels, conv.kernel_size[0] * conv.kernel_size[1])
            size = h * conv.stride[0] * w * conv.stride[1]
            block = max(block, 12 * min(self.cfg["chunk"], c_out) * taps * b * size)
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
