"""Gradient norms at each tracked module and the data flow between them (SPEC §5 `gradient_flow`):
‖∂L/∂W‖₂ and ‖∂L/∂y‖₂ per module every `every` steps, and the edges between modules once."""

from __future__ import annotations

import sys
from functools import partial
from typing import Any

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from netprobe.errors import ConfigError
from netprobe.probes.base import Probe, ProbeContext, StepState
from netprobe.probes.capture import output_tensor
from netprobe.probes.options import Option
from netprobe.probes.reductions import l2_norms, stat_dtype
from netprobe.probes.schedule import Schedule
from netprobe.structure import module_graph


def node_gradient_norms(grads: list[torch.Tensor], node_of_grad: torch.Tensor, nodes: int):
    """`w_grad_l2` = ‖∂L/∂W‖₂ over all of a node's parameters: √Σ_{p ∈ node} ‖g_p‖₂², per node."""
    squares = torch.stack(l2_norms(grads, stat_dtype(grads))).square()
    total = torch.zeros(nodes, dtype=squares.dtype, device=squares.device)
    return total.index_add_(0, node_of_grad, squares).sqrt()


def output_gradient_norm(grad: torch.Tensor) -> torch.Tensor:
    """‖∂L/∂y‖₂² of one output gradient, at least in float32 (summed over calls, then √)."""
    return torch.linalg.vector_norm(grad, dtype=stat_dtype([grad])).square()


class GradientFlow(Probe):
    """Every `every` steps: ‖∂L/∂W‖₂ and ‖∂L/∂y‖₂ per tracked module; the edges once at start.

    ∂L/∂y is read with tensor hooks on the module outputs. A permanent forward hook on each tracked
    module adds them only during the forward of a recorded step (the schedule's `arm` sets them
    watching for the step to come), and they are removed once the step's backward is read, so
    between recorded steps no tensor hook exists. Under torch.compile the hooks read only that
    one bool, so the compiled graph has two variants (watching or not) instead of a recompile per
    step, and adding the tensor hooks runs eagerly (a graph break on recorded steps only). A hook
    on the output tensor itself, unlike a module backward hook, keeps working when an in-place
    activation overwrites that output afterwards: it reports the gradient with respect to the
    value the module produced.
    """

    name = "gradient_flow"
    measures = "w_grad_l2 and out_grad_l2 per tracked module; the edges between them at start"
    # Output hooks are set for the coming forward pass on the step before each recorded one.
    default_schedule = Schedule(every=10, arm=True)
    # The figure draws edges green above `threshold` (None: 0.1 × the run's median edge value);
    # it reads the value from the run's config.
    options = (Option("threshold", float, None, low=0, nullable=True),)

    def __init__(self, ctx: ProbeContext, **cfg: Any) -> None:
        super().__init__(ctx, **cfg)
        if self.schedule.every is None:
            raise ConfigError(
                f"probes.{self.name}.every must be a number of steps: the probe reads the "
                "training step's own backward pass, which the start/epoch/end points lack"
            )
        self.modules = self.select_modules()
        self.names = [n for n, _ in self.modules]
        # Edges from the fx trace over the tracked modules themselves: it follows each value
        # through untracked modules and functions call by call, which contracting the all-module
        # graph cannot do when an untracked module is called twice (torchvision's ResNet reuses one
        # ReLU per block). Recorded once, as matrices `edge` (row = source, col = target).
        self.edges = module_graph(ctx.model, self.names) if self.names else []
        # Each node's own parameters (not its children's: those are nodes of their own).
        self.params = [
            (i, p)
            for i, (_, m) in enumerate(self.modules)
            for p in m.parameters(recurse=False)
            if p.requires_grad
        ]
        self._node_index: dict[tuple[torch.device, tuple[int, ...]], Any] = {}
        self._watching = False  # whether the coming forward is a recorded step's
        self._kept_out_of_graphs = False
        self._pass = 0  # forward passes of the whole model while armed
        self._stash: dict[str, tuple[int, torch.Tensor]] = {}  # module -> (pass, Σ‖∂L/∂y‖²)
        self._tensor_hooks: list[RemovableHandle] = []
        self._module_hooks: list[RemovableHandle] = [
            m.register_forward_hook(partial(self._on_forward, name)) for name, m in self.modules
        ]
        self._module_hooks.append(ctx.model.register_forward_pre_hook(self._on_model_forward))

    # -- hooks on the model
    def _on_model_forward(self, _module: nn.Module, _args: Any) -> None:
        if self._watching:
            self._count_pass()

    def _on_forward(self, name: str, _module: nn.Module, _inputs: Any, output: Any) -> None:
        if self._watching and torch.is_grad_enabled():
            self._watch(name, output)

    def arm(self, state: StepState) -> None:
        """The coming forward is a recorded step's. Once torch.compile is in use (it has loaded
        torch._dynamo), the two helpers below run eagerly, outside compiled graphs; a run without
        it never imports torch._dynamo (a second or more of start-up)."""
        self._watching = True
        if not self._kept_out_of_graphs and "torch._dynamo" in sys.modules:
            self._count_pass = torch.compiler.disable(self._count_pass)
            self._watch = torch.compiler.disable(self._watch)
            self._kept_out_of_graphs = True

    def _count_pass(self) -> None:
        self._pass += 1

    def _watch(self, name: str, output: Any) -> None:
        tensor = output_tensor(output)
        if tensor is not None and tensor.requires_grad:
            hook = partial(self._on_output_grad, name, self._pass)
            self._tensor_hooks.append(tensor.register_hook(hook))

    def _on_output_grad(self, name: str, pass_id: int, grad: torch.Tensor) -> None:
        square = output_gradient_norm(grad)
        previous = self._stash.get(name)
        # A module called several times in one pass adds up its calls.
        if previous is not None and previous[0] == pass_id:
            square = previous[1] + square
        elif previous is not None and previous[0] > pass_id:
            return
        self._stash[name] = (pass_id, square)

    # -- probe hooks
    def start(self, state: StepState) -> None:
        for source, target in self.edges:
            self.ctx.record.matrix(self.name, "edge", source, target, torch.ones(1))

    def after_backward(self, state: StepState) -> None:
        self._watching = False  # until `arm` for the next recorded step
        self._record_output_grads(state.loss_scale)
        self._record_weight_grads()

    def close(self) -> None:
        for handle in self._module_hooks + self._tensor_hooks:
            handle.remove()
        self._module_hooks, self._tensor_hooks = [], []

    # -- recording
    def _record_output_grads(self, loss_scale: torch.Tensor | float | None) -> None:
        stash, self._stash = self._stash, {}
        for handle in self._tensor_hooks:
            handle.remove()
        self._tensor_hooks = []
        if not stash:
            return
        # Only the latest forward pass that was backpropagated: the training step's own. Passes
        # other probes ran earlier at the same step (their own forward and backward) are ignored.
        latest = max(pass_id for pass_id, _ in stash.values())
        names = [n for n in self.names if n in stash and stash[n][0] == latest]
        values = torch.stack([stash[n][1] for n in names]).sqrt()
        if loss_scale is not None:  # the hooks saw ∂(s·L)/∂y; SPEC: after unscaling
            values = values / loss_scale
        self.ctx.record.scalars(self.name, names, ["out_grad_l2"], values[:, None])

    def _record_weight_grads(self) -> None:
        present = [(i, p.grad) for i, p in self.params if p.grad is not None]
        if not present:
            return
        nodes = tuple(i for i, _ in present)
        device = present[0][1].device
        # Index tensors are built once per device and set of nodes: no host copies per capture.
        key = (device, nodes)
        if key not in self._node_index:
            with_grad = sorted(set(nodes))
            self._node_index[key] = (
                torch.tensor(nodes, dtype=torch.long, device=device),
                torch.tensor(with_grad, dtype=torch.long, device=device),
                [self.names[i] for i in with_grad],
            )
        node_of_grad, rows, names = self._node_index[key]
        norms = node_gradient_norms([g for _, g in present], node_of_grad, len(self.names))
        self.ctx.record.scalars(self.name, names, ["w_grad_l2"], norms[rows][:, None])
