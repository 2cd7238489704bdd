"""Outputs of chosen modules during one extra forward pass in eval mode, for capture-time probes.

The forward hooks exist only for that one pass and every module's own train/eval flag is put back
afterwards (a model may keep some submodules in eval mode on purpose, e.g. frozen BatchNorm).
Each hook hands the rest of the network a clone of the module's output, so an in-place operation
downstream (`ReLU(inplace=True)`) can never overwrite the value kept here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from netprobe.structure import eval_mode


@dataclass
class ModuleOutputs:
    """What one forward pass gave: the model's output, each module's (reduced) output and input
    shape. A module called several times keeps its first call; one whose output is not a tensor is
    absent."""

    output: torch.Tensor
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    input_shapes: dict[str, torch.Size] = field(default_factory=dict)


def module_outputs(
    model: nn.Module,
    modules: list[tuple[str, nn.Module]],
    x: torch.Tensor,
    reduce: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    grad: bool = False,
) -> ModuleOutputs:
    """Run `model(x)` once in eval mode and keep `reduce(name, output)` of every module in
    `modules`; it runs inside the hook, so only the reduced value outlives the hook call.

    With `grad`, autograd stays on and the kept outputs are nodes of the graph (for
    `torch.autograd.grad(loss, ...)`); without, nothing is recorded for backward.
    """
    values: dict[str, torch.Tensor] = {}
    shapes: dict[str, torch.Size] = {}

    def hook(name: str) -> Callable:
        def keep(_module: nn.Module, inputs: tuple, output: object) -> object:
            if name in values or not isinstance(output, torch.Tensor):
                return None
            if inputs and isinstance(inputs[0], torch.Tensor):
                shapes[name] = inputs[0].shape
            values[name] = reduce(name, output) if reduce is not None else output
            # Downstream computes on a copy: in-place ops there leave the kept value intact.
            return output.clone()

        return keep

    handles = [m.register_forward_hook(hook(name)) for name, m in modules]
    try:
        with eval_mode(model), torch.set_grad_enabled(grad):
            out = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return ModuleOutputs(out, values, shapes)


def flatten_features(output: torch.Tensor, conv: str = "pool") -> torch.Tensor:
    """A module output as [B, d]: outputs with spatial dims are averaged per channel (`pool`) or
    kept whole (`flatten`); [B, d] stays as it is."""
    if output.ndim > 2 and conv == "pool":
        return output.flatten(2).mean(dim=2)
    return output.reshape(output.shape[0], -1)


def seeded_subset(d: int, k: int, generator: torch.Generator) -> torch.Tensor | None:
    """Sorted indices of k of d features drawn with `generator`, or None when d ≤ k (keep all)."""
    if d <= k:
        return None
    return torch.randperm(d, generator=generator)[:k].sort().values
