"""How much gradient each conv channel sends back and receives (SPEC §5 `channels`).

For a tracked Conv2d (groups = 1) with weight W [C_out, C_in, k, k] and g = ∂L/∂y at its output on
the probe batch (one forward and backward in eval mode; `.grad` of the parameters is not touched),
the gradient that output channel c1 sends to input channel c2 is

    LG^{c1→c2} = conv_transpose2d(g[:, c1], W[c1, c2])   (the conv's stride, padding, dilation),

and Σ_{c1} LG^{c1→c2} is ∂L/∂x[:, c2]. Per channel: emission Em_{c1} = Σ_{c2} ‖LG^{c1→c2}‖_F and
absorption Ab_{c2} = Σ_{c1} ‖LG^{c1→c2}‖_F, norms over batch and space. Recorded as matrices
`emission` [C_out] and `absorption` [C_in] (row = the conv), and scalars `em_mean`, `em_std`,
`ab_mean`, `ab_std` (population std over channels).

All pairs of a block go through one grouped conv_transpose2d; blocks hold at most `chunk` channel
pairs, so memory stays near chunk × B × H_in × W_in values whatever the layer's width.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from netprobe.errors import ConfigError
from netprobe.probes.base import Probe, ProbeContext
from netprobe.probes.module_outputs import module_outputs

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


def channel_pair_norms(
    g: torch.Tensor,
    weight: torch.Tensor,
    input_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    chunk: int = 256,
) -> torch.Tensor:
    """‖LG^{c1→c2}‖_F for every pair, [C_out, C_in], with g [B, C_out, H_out, W_out].

    A block of k1 output channels × k2 input channels is one conv_transpose2d with groups = k1:
    group c1 maps g[:, c1] through W[c1, c2] for each of the k2 input channels c2 at once.
    """
    c_out, c_in = weight.shape[:2]
    k2 = min(c_in, chunk)
    k1 = max(1, chunk // k2)
    h, w = input_size
    # Output size of the transpose without output_padding; the rest of the input (rows the
    # strided conv never reached) comes from output_padding, or is cropped for asymmetric `same`.
    full = [
        (o - 1) * s - 2 * p + d * (k - 1) + 1
        for o, s, p, d, k in zip(g.shape[2:], stride, padding, dilation, weight.shape[2:])
    ]
    extra = tuple(max(0, size - f) for size, f in zip((h, w), full))
    norms = torch.empty(c_out, c_in, dtype=torch.float32, device=g.device)
    for a in range(0, c_out, k1):
        n1 = min(k1, c_out - a)
        for b in range(0, c_in, k2):
            n2 = min(k2, c_in - b)
            lg = F.conv_transpose2d(
                g[:, a : a + n1],
                weight[a : a + n1, b : b + n2],
                stride=stride,
                padding=padding,
                output_padding=extra,
                groups=n1,
                dilation=dilation,
            )[:, :, :h, :w]
            norm = torch.linalg.vector_norm(lg, dim=(0, 2, 3), dtype=torch.float32)
            norms[a : a + n1, b : b + n2] = norm.view(n1, n2)
    return norms


def emission_absorption(norms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Em_{c1} = Σ_{c2} ‖LG^{c1→c2}‖_F and Ab_{c2} = Σ_{c1} ‖LG^{c1→c2}‖_F from [C_out, C_in]."""
    return norms.sum(dim=1), norms.sum(dim=0)


class Channels(Probe):
    """At the end (or each epoch): per-channel gradient emission and absorption of each conv."""

    name = "channels"
    default_at = ("end",)
    options = {"chunk": 256}

    def __init__(self, ctx: ProbeContext, **cfg: Any) -> None:
        super().__init__(ctx, **cfg)
        chunk = self.cfg["chunk"]
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ConfigError(f"probes.{self.name}.chunk={chunk!r} must be a positive integer")
        model = ctx.model
        chosen = self.select_modules(lambda r: is_tracked_conv(model.get_submodule(r.module)))
        self.modules = [(n, m) for n, m in chosen if is_tracked_conv(m)]
        if self.patterns and not self.modules:
            convs = [n for n, m in model.named_modules() if is_tracked_conv(m)]
            raise ConfigError(
                f"probes.{self.name}.layers {self.patterns} select no Conv2d with groups=1; "
                f"those are: {', '.join(convs) or 'none in this model'}"
            )

    def output_gradients(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Size]]:
        """g = ∂L/∂y of each tracked conv on the probe batch, and the shape of its input."""
        x, y = self.ctx.probe_batch
        outs = module_outputs(self.ctx.model, self.modules, x, grad=True)
        names = [n for n, _ in self.modules if n in outs.values and outs.values[n].requires_grad]
        if not names:
            return {}, {}
        loss = self.ctx.loss_fn(outs.output, y)
        grads = torch.autograd.grad(loss, [outs.values[n] for n in names], allow_unused=True)
        found = {n: g for n, g in zip(names, grads) if g is not None}
        return found, outs.input_shapes

    def capture(self) -> None:
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
