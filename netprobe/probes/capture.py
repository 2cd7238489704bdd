"""Capturing what modules output: one extra eval-mode forward pass with temporary hooks, and
the [B, d] features capture-time probes compare (`conv`, `max_features`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from math import prod
from typing import Any

import torch
import torch.nn as nn

from netprobe.probes.options import Option
from netprobe.structure import eval_mode

CONV_CHOICES = ("pool", "flatten")
# The settings of `Features`, in every probe that compares features.
FEATURE_OPTIONS = (
    Option("conv", str, "pool", choices=CONV_CHOICES),
    Option("max_features", int, 256, low=2),
)


def output_tensor(output: Any) -> torch.Tensor | None:
    """The tensor every probe measures of a module's output: the output itself, else the first
    tensor found depth-first in its tuples, lists and dict values (nn.LSTM's `output`, not its
    `(h, c)`); None when there is none."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            found = output_tensor(item)
            if found is not None:
                return found
    return None


def _replace(output: Any, old: torch.Tensor, new: torch.Tensor) -> Any:
    """`output` with the tensor `old` replaced by `new` wherever it stands (see output_tensor)."""
    if output is old:
        return new
    if isinstance(output, Mapping):
        return type(output)((k, _replace(v, old, new)) for k, v in output.items())
    if isinstance(output, (tuple, list)):
        items = [_replace(item, old, new) for item in output]
        return type(output)(*items) if hasattr(output, "_fields") else type(output)(items)
    return output


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@dataclass
class ModuleOutputs:
    """What one forward pass gave: the model's output, each module's (reduced) output and input
    shape. A module called several times keeps its first call; one whose output holds no tensor
    is absent."""

    output: torch.Tensor
    values: dict[str, Any] = field(default_factory=dict)
    input_shapes: dict[str, torch.Size] = field(default_factory=dict)


def module_outputs(
    model: nn.Module,
    modules: list[tuple[str, nn.Module]],
    x: torch.Tensor,
    reduce: Callable[[str, torch.Tensor], Any] | None = None,
    grad: bool = False,
) -> ModuleOutputs:
    """Run `model(x)` once in eval mode and keep `reduce(name, y)` of the `output_tensor` y of
    every module in `modules`; it runs inside the hook, so only the reduced value outlives it.

    Every module's own train/eval flag is put back afterwards (a frozen BatchNorm stays frozen).
    Where the kept value is y or a view of it, the rest of the network computes on a clone of y,
    so an in-place operation downstream (`ReLU(inplace=True)`) never overwrites it. With `grad`,
    autograd stays on and the kept outputs are nodes of the graph (for `torch.autograd.grad`).
    """
    values: dict[str, Any] = {}
    shapes: dict[str, torch.Size] = {}

    def hook(name: str) -> Callable:
        def keep(_module: nn.Module, inputs: tuple, output: Any) -> Any:
            y = output_tensor(output)
            if name in values or y is None:
                return None
            if inputs and isinstance(inputs[0], torch.Tensor):
                shapes[name] = inputs[0].shape
            kept = values[name] = reduce(name, y) if reduce is not None else y
            if isinstance(kept, torch.Tensor) and not _shares_memory(kept, y):
                return None  # a reduced copy: nothing downstream can overwrite it
            return _replace(output, y, y.clone())

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


def feature_count(shape: tuple[int, ...], conv: str) -> int:
    """How many features `flatten_features` makes of an output of this shape per sample."""
    if len(shape) > 1 and conv == "pool":
        return shape[0]
    return prod(shape) if shape else 0


def seeded_subset(d: int, k: int, generator: torch.Generator) -> torch.Tensor | None:
    """Sorted indices of k of d features drawn with `generator`, or None when d ≤ k (keep all)."""
    if d <= k:
        return None
    return torch.randperm(d, generator=generator)[:k].sort().values


class Features:
    """[B, d] features of `modules`: each output flattened as `conv` says, then at most `k` of its
    columns, a subset drawn once per module (the i-th from `generator(salt + i)`), so that every
    capture of the run looks at the same features."""

    def __init__(
        self,
        modules: list[tuple[str, nn.Module]],
        conv: str,
        k: int,
        generator: Callable[[int], torch.Generator],
        salt: int,
    ) -> None:
        self.modules, self.conv, self.k = modules, conv, k
        self._generator, self._salt = generator, salt
        self.picks: dict[str, torch.Tensor | None] = {}  # columns kept per module; None: all

    def __call__(self, model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each module's features on the batch x, in forward order. The subset is taken inside
        the hook, so a whole flattened output is never kept."""
        outs = module_outputs(model, self.modules, x, reduce=self.reduce)
        return {name: outs.values[name] for name, _ in self.modules if name in outs.values}

    def reduce(self, name: str, output: torch.Tensor) -> torch.Tensor:
        x = flatten_features(output, self.conv)
        if name not in self.picks:
            salt = self._salt + [n for n, _ in self.modules].index(name)
            pick = seeded_subset(x.shape[1], self.k, self._generator(salt))
            self.picks[name] = None if pick is None else pick.to(x.device)
        pick = self.picks[name]
        return x if pick is None else x.index_select(1, pick)

    def dims(self, shapes: Mapping[str, tuple[int, ...]]) -> list[int]:
        """Features per module, from each output's shape per sample (for memory estimates)."""
        return [min(feature_count(shapes[name], self.conv), self.k) for name, _ in self.modules]
