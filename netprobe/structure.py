"""What a model is made of: its leaf modules in forward order, their parameters, the data flow."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn

WEIGHT_TYPES = (nn.Linear, nn.modules.conv._ConvNd)


@dataclass(frozen=True)
class LayerInfo:
    """One row of layers.parquet: a leaf module (`param == ""`) or one of its parameters."""

    order: int
    module: str
    param: str
    type: str
    shape: tuple[int, ...]
    numel: int

    @property
    def name(self) -> str:
        """The name stored in `layer`: `features.0.weight` for a parameter, else the module."""
        return f"{self.module}.{self.param}" if self.param else self.module


def leaf_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules without children, plus any module that owns parameters directly."""
    return {
        name: m
        for name, m in model.named_modules()
        if name and (not any(True for _ in m.children()) or any(True for _ in m.parameters(False)))
    }


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module of `model` in eval mode; on exit each module gets its own flag back (a model
    may keep some submodules in eval mode on purpose, e.g. frozen BatchNorm)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for module, training in modes:
            module.training = training


def layer_table(model: nn.Module, example: torch.Tensor | None = None) -> list[LayerInfo]:
    """Rows for every leaf module and parameter, ordered as the forward pass runs them.

    With an `example` batch, one eval-mode forward records execution order and output shapes;
    without, registration order stands in and module shapes are left empty.
    """
    leaves = leaf_modules(model)
    order: dict[str, int] = {}
    out_shape: dict[str, tuple[int, ...]] = {}
    if example is not None:
        # Here, not at the top: the probes package imports this module.
        from netprobe.probes.capture import output_tensor

        def record(name: str):
            def hook(_m: nn.Module, _inp: object, out: object) -> None:
                order.setdefault(name, len(order))
                y = output_tensor(out)
                if y is not None:
                    out_shape.setdefault(name, tuple(y.shape[1:]))

            return hook

        handles = [m.register_forward_hook(record(n)) for n, m in leaves.items()]
        try:
            with eval_mode(model), torch.no_grad():
                model(example[:2])
        finally:
            for h in handles:
                h.remove()
    # Modules the forward never reached keep their registration order, after the rest.
    for name in leaves:
        order.setdefault(name, len(order))

    rows: list[LayerInfo] = []
    for name, module in sorted(leaves.items(), key=lambda kv: order[kv[0]]):
        shape = out_shape.get(name, ())
        numel = int(torch.Size(shape).numel()) if shape else 0
        kind = type(module).__name__
        rows.append(LayerInfo(order[name], name, "", kind, shape, numel))
        for pname, p in module.named_parameters(recurse=False):
            rows.append(LayerInfo(order[name], name, pname, kind, tuple(p.shape), p.numel()))
    return rows


def is_weight_layer(row: LayerInfo, model: nn.Module) -> bool:
    """The default selection of parameter probes: every conv and linear weight."""
    return row.param == "weight" and isinstance(model.get_submodule(row.module), WEIGHT_TYPES)


def module_graph(model: nn.Module, modules: list[str]) -> list[tuple[str, str]]:
    """Edges of the data flow between `modules` (forward order), traced with torch.fx if possible.

    Values passing through functions or untracked modules are followed back to the nearest tracked
    module. When the model cannot be traced, consecutive modules are chained in forward order.
    """
    tracked = set(modules)
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - any tracing failure means "use forward order"
        return list(zip(modules[:-1], modules[1:]))

    sources: dict[torch.fx.Node, set[str]] = {}
    edges: list[tuple[str, str]] = []
    for node in graph.nodes:
        upstream: set[str] = set()
        for inp in node.all_input_nodes:
            upstream |= sources.get(inp, set())
        if node.op == "call_module" and node.target in tracked:
            edges += [(src, node.target) for src in sorted(upstream) if src != node.target]
            sources[node] = {node.target}
        else:
            sources[node] = upstream
    if not edges and len(modules) > 1:
        return list(zip(modules[:-1], modules[1:]))
    seen: set[tuple[str, str]] = set()
    return [e for e in edges if not (e in seen or seen.add(e))]
