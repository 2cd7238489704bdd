"""What every probe shares: its hooks and schedule, what it tracks, the context it reads and the
per-step state it is handed."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn

import numpy as np
import torch
import torch.nn as nn

from netprobe.errors import ConfigError
from netprobe.probes.options import Option, as_list
from netprobe.probes.schedule import Schedule
from netprobe.structure import LayerInfo, is_weight_layer

if TYPE_CHECKING:
    from netprobe.native.step import Read
    from netprobe.recorder import Recorder


@dataclass
class StepState:
    """Where training is and the current step's facts, handed to every hook; the monitor keeps
    one and updates it as training goes (the recorder tags each record with its step and epoch).

    `step`: optimizer steps done so far (the index of the step under way); `epoch`: epochs done;
    `loss`, `grad_l2_total` (‖∂L/∂θ‖₂ over every parameter; a float on the CPU, where it is
    computed on the host), `grad_rows` and `loss_scale` (the GradScaler's scale of the loss just
    backpropagated: tensor hooks saw gradients of the scaled loss) once the step's backward is
    done, None before and without them; `point`: the capture point under way (start, epoch or
    end), None during a step.

    `grad_rows`: [l1, l2, mean_abs, max_abs, nonfinite] of each of `trained_params`' gradients,
    in that order, from the read that gave `grad_l2_total`: made on the CPU by the fused kernel,
    at the steps a probe that reads them (`Probe.reads_grad_rows`) records, when every trained
    parameter has a gradient; None elsewhere. A host array of this step's, never written again.

    `grad_read`: on the CPU, where the fused kernel read every one of `trained_params`'
    gradients in place, those gradients as checked by that read (a `netprobe.native.step.Read`,
    in that order): a probe's kernels read them again from it without checking each again.
    Set during `after_backward` and `arm` only (it holds the gradients), None elsewhere."""

    step: int = 0
    epoch: int = 0
    loss: torch.Tensor | None = None
    grad_l2_total: torch.Tensor | float | None = None
    grad_rows: np.ndarray | None = None
    grad_read: Read | None = None
    loss_scale: torch.Tensor | float | None = None
    point: str | None = None


def trained_params(model: nn.Module) -> list[nn.Parameter]:
    """The parameters training updates (those requiring a gradient), in the model's order: what
    `grad_l2_total` runs over, and `grad_rows`' and `grad_read`'s order."""
    return [p for p in model.parameters() if p.requires_grad]


def trained_positions(model: nn.Module, tensors: list[torch.Tensor]) -> list[int | None]:
    """Where each of `tensors` is among `trained_params(model)` (None: not trained)."""
    trained = {id(p): i for i, p in enumerate(trained_params(model))}
    return [trained.get(id(t)) for t in tensors]


@dataclass
class ProbeContext:
    """Everything a probe may read: the model, its structure, the probe batch, and the recorder."""

    model: nn.Module
    layers: list[LayerInfo]
    edges: list[tuple[str, str]]
    record: Recorder
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    probe_batch: tuple[torch.Tensor, torch.Tensor] | None = None
    valid_batch: tuple[torch.Tensor, torch.Tensor] | None = None
    seed: int = 0

    def generator(self, salt: int, device: torch.device | str = "cpu") -> torch.Generator:
        """A generator seeded from the run seed and `salt`, independent of the training RNG."""
        g = torch.Generator(device=device)
        g.manual_seed(self.seed * 1_000_003 + salt)
        return g


class SparseGradients(RuntimeError):
    """A probe that reads dense gradients met a sparse one while training."""


class Probe:
    """Base class. Subclasses set `name`, `measures` and `default_schedule`, and override the
    hooks they need; the monitor calls them when the probe's `schedule` says (`ProbeRunner`).

    Hooks, each given the `StepState`: `start` (a new run, before its first step), `after_backward`
    (a recorded step's gradients are in `.grad`) and `after_step` (its weights are updated),
    `arm` (the coming step is recorded, for schedules with `arm`), `capture` at the `at` points,
    and `close` however the run ends. Results go to `self.ctx.record` as device tensors.
    """

    name: ClassVar[str]
    measures: ClassVar[str] = ""  # what it records, in a few words (`netprobe probes`)
    default_schedule: ClassVar[Schedule] = Schedule()
    # Settings a probe takes besides the common ones; `self.cfg` holds their checked values.
    options: ClassVar[tuple[Option, ...]] = ()
    # Whether it reads `StepState.grad_rows` (set by the probe for itself): the monitor makes
    # them only at the steps such a probe records.
    reads_grad_rows = False

    def __init__(self, ctx: ProbeContext, **cfg: Any) -> None:
        self.ctx = ctx
        common = {"layers", "exclude", "every", "at", "enabled"}
        keys = {option.name for option in self.options}
        unknown = set(cfg) - common - keys
        if unknown:
            valid = ", ".join(sorted(common | keys))
            raise ConfigError(
                f"unknown key {sorted(unknown)[0]!r} for probe {self.name}; valid keys: {valid}"
            )
        self.cfg = {o.name: o.read(self.name, cfg.get(o.name, o.default)) for o in self.options}
        self.patterns = self._regexes("layers", cfg.get("layers"))
        self.exclude = self._regexes("exclude", cfg.get("exclude"))
        self.schedule = Schedule.parse(self.name, self.default_schedule, cfg)
        # (step, point) of the latest capture: one capture per step, kept across a resume.
        self.last_capture: tuple[int, str | None] | None = None

    def _regexes(self, key: str, value: Any) -> list[str]:
        patterns = [str(p) for p in as_list(value)]
        for p in patterns:
            try:
                re.compile(p)
            except re.error as exc:
                raise ConfigError(
                    f"probes.{self.name}.{key} pattern {p!r} is not a valid regex: {exc}"
                ) from None
        return patterns

    @property
    def tracks_nothing(self) -> bool:
        """Whether its `layers`, `exclude` and defaults left it no tensor or module of this model
        (`channels` on an MLP, an `exclude` of everything): attached, it records nothing."""
        selected = [getattr(self, key) for key in ("params", "modules") if hasattr(self, key)]
        return bool(selected) and not any(selected)

    # -- hooks
    def start(self, state: StepState) -> None: ...

    def after_backward(self, state: StepState) -> None: ...

    def arm(self, state: StepState) -> None: ...

    def after_step(self, state: StepState) -> None: ...

    def capture(self, state: StepState) -> None: ...

    def at_point(self, state: StepState) -> None:
        """At one of the schedule's `at` points: `capture`, once per step (the last epoch's
        capture is also the end's)."""
        if self.last_capture is None or self.last_capture[0] != state.step:
            self.last_capture = (state.step, state.point)
            self.capture(state)

    def close(self) -> None:
        """Release what the probe holds on the model (hooks); called however the run ends."""

    def memory_estimate(self) -> tuple[int, str]:
        """Peak bytes one capture holds beyond training itself, from the model's shapes and the
        settings, and the setting that lowers it (`probes.memory_budget` is checked against it).
        Per-step probes hold a few numbers per tensor: 0."""
        return 0, ""

    def module_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each module's output shape per sample (from the traced forward pass; () if unknown)."""
        return {r.module: r.shape for r in self.ctx.layers if not r.param}

    # -- resuming: what a probe carries from one step to the next (previous weights, fixed bins)
    def state_dict(self) -> dict[str, Any]:
        return {"last_capture": self.last_capture}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        last = state.get("last_capture")
        self.last_capture = None if last is None else (last[0], last[1])

    def load_tracked(self, state: dict[str, Any], *keys: str) -> dict[str, list[torch.Tensor]]:
        """For probes tracking `self.params`: the per-parameter tensors saved under each of `keys`
        that `state` has, copied onto each parameter's device and dtype. The saved state must
        track the same parameters (`names`)."""
        names = [n for n, _ in self.params]
        if list(state.get("names", [])) != names:
            raise ConfigError(
                f"probes.{self.name}: the saved state tracks {state.get('names')}, "
                f"this run tracks {names}"
            )
        return {
            key: [state[key][n].to(device=p.device, dtype=p.dtype).clone() for n, p in self.params]
            for key in keys
            if key in state
        }

    # -- selection
    def select(
        self, rows: list[LayerInfo], default: Callable[[LayerInfo], bool]
    ) -> list[LayerInfo]:
        """Rows whose name fully matches one of `layers` (else `default`), minus `exclude`."""
        if self.patterns:
            chosen = [r for r in rows if any(re.fullmatch(p, r.name) for p in self.patterns)]
            for p in self.patterns:
                if not any(re.fullmatch(p, r.name) for r in rows):
                    names = ", ".join(r.name for r in rows)
                    raise ConfigError(
                        f"probes.{self.name}.layers pattern {p!r} matches nothing; "
                        f"available: {names}"
                    )
        else:
            chosen = [r for r in rows if default(r)]
        for p in self.exclude:
            if not any(re.fullmatch(p, r.name) for r in rows):
                raise ConfigError(
                    f"probes.{self.name}.exclude pattern {p!r} matches nothing; "
                    f"available: {', '.join(r.name for r in rows)}"
                )
        return [r for r in chosen if not any(re.fullmatch(p, r.name) for p in self.exclude)]

    def select_params(
        self, default: Callable[[LayerInfo], bool] | None = None
    ) -> list[tuple[str, torch.nn.Parameter]]:
        """Tracked parameters as (name, tensor); default: every conv and linear weight."""
        model = self.ctx.model
        rows = [r for r in self.ctx.layers if r.param]
        default = default or (lambda r: is_weight_layer(r, model))
        params = dict(model.named_parameters())
        return [(r.name, params[r.name]) for r in self.select(rows, default) if r.name in params]

    def select_dense_grads(self) -> list[tuple[str, torch.nn.Parameter]]:
        """`select_params()`, refusing a parameter whose module makes sparse gradients (an
        `nn.Embedding(sparse=True)`'s weight): a probe that reads gradients reads dense ones."""
        params = self.select_params()
        for name, _ in params:
            module = self.ctx.model.get_submodule(name.rpartition(".")[0])
            if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse:
                what = f"{type(module).__name__}(sparse=True)"
                raise ConfigError(
                    self._sparse_message(name, what) + ", or train it with sparse=False"
                )
        return params

    def failed_read(self, params: list[tuple[str, torch.nn.Parameter]], exc: Exception) -> NoReturn:
        """Raises for `exc`, a failed read of these parameters' gradients: where one of them is
        not dense (a module of the user's calling F.embedding(..., sparse=True), which
        `select_dense_grads` cannot see), the error that names it; else `exc` itself."""
        for name, param in params:
            grad = param.grad
            if grad is not None and grad.layout is not torch.strided:
                raise SparseGradients(self._sparse_message(name, str(grad.layout))) from exc
        raise exc

    def _sparse_message(self, name: str, what: str) -> str:
        return (
            f"probes.{self.name} tracks {name}, whose gradients are sparse ({what}), and reads "
            f"dense ones only; leave it out with probes.{self.name}.exclude"
        )

    def select_modules(
        self, default: Callable[[LayerInfo], bool] | None = None
    ) -> list[tuple[str, nn.Module]]:
        """Tracked modules as (name, module), forward order; default: modules with parameters."""
        model = self.ctx.model
        rows = [r for r in self.ctx.layers if not r.param]
        has_params = {r.module for r in self.ctx.layers if r.param}
        default = default or (lambda r: r.module in has_params)
        return [(r.module, model.get_submodule(r.module)) for r in self.select(rows, default)]
