"""What every probe shares: its schedule, what it tracks, and where it records."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn as nn

from netprobe.errors import ConfigError
from netprobe.probes.options import Option
from netprobe.probes.options import as_list as _as_list
from netprobe.structure import LayerInfo, is_weight_layer

if TYPE_CHECKING:
    from netprobe.monitor import Recorder

AT_CHOICES = ("start", "epoch", "end")


@dataclass
class Progress:
    """Where training is: `step` optimizer steps done so far (the index of the step under way)."""

    step: int = 0
    epoch: int = 0


@dataclass
class ProbeContext:
    """Everything a probe may read: the model, its structure, the probe batch, and the recorder."""

    model: nn.Module
    layers: list[LayerInfo]
    edges: list[tuple[str, str]]
    record: Recorder
    progress: Progress
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    probe_batch: tuple[torch.Tensor, torch.Tensor] | None = None
    valid_batch: tuple[torch.Tensor, torch.Tensor] | None = None
    seed: int = 0
    # ‖∂L/∂θ‖₂ over every parameter at the current step, once the monitor has it (after backward).
    grad_l2_total: torch.Tensor | None = None
    # The GradScaler's scale of the current step's loss (None without one): tensor hooks see
    # gradients of the scaled loss, which `.grad` no longer holds once unscaled.
    loss_scale: torch.Tensor | float | None = None

    def generator(self, salt: int, device: torch.device | str = "cpu") -> torch.Generator:
        """A generator seeded from the run seed and `salt`, independent of the training RNG."""
        g = torch.Generator(device=device)
        g.manual_seed(self.seed * 1_000_003 + salt)
        return g


class Probe:
    """Base class. Subclasses set `name`, their default schedule, and override the hooks they need.

    Hooks, called by the monitor: `after_backward` (gradients are in `.grad`), `after_step` (weights
    updated), `capture` at the `at` points (`start` before the first step, `epoch` after each
    epoch, `end` after training), and `close` however the run ends. Results go to
    `self.ctx.record` as device tensors.
    """

    name: ClassVar[str]
    default_every: ClassVar[int | None] = None
    default_at: ClassVar[tuple[str, ...]] = ()
    # Settings a probe takes besides the common ones; `self.cfg` holds their checked values.
    options: ClassVar[tuple[Option, ...]] = ()

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
        every = cfg.get("every", self.default_every)
        at = cfg.get("at", self.default_at)
        if every == "epoch":
            every, at = None, ("epoch",)
        if every is not None and (not isinstance(every, int) or every < 1):
            raise ConfigError(
                f"probes.{self.name}.every={every!r} must be a positive number of steps or 'epoch'"
            )
        at = tuple(_as_list(at))
        for point in at:
            if point not in AT_CHOICES:
                raise ConfigError(
                    f"probes.{self.name}.at has {point!r}; valid: {', '.join(AT_CHOICES)}"
                )
        # A setting the probe would ignore is an error, not a run that silently records nothing.
        if self.default_every is None and every is not None:
            raise ConfigError(
                f"probes.{self.name}.every={every!r}: {self.name} captures at fixed points, not "
                f"every N steps; set probes.{self.name}.at (valid: {', '.join(AT_CHOICES)})"
            )
        if not self.default_at and at:
            raise ConfigError(
                f"probes.{self.name}: {self.name} records every N steps, not at {list(at)}; "
                f"set probes.{self.name}.every to a positive number of steps"
            )
        self.every: int | None = every
        self.at = at
        self._last_capture: int | None = None

    def _regexes(self, key: str, value: Any) -> list[str]:
        patterns = [str(p) for p in _as_list(value)]
        for p in patterns:
            try:
                re.compile(p)
            except re.error as exc:
                raise ConfigError(
                    f"probes.{self.name}.{key} pattern {p!r} is not a valid regex: {exc}"
                ) from None
        return patterns

    # -- schedule
    def due(self, step: int | None = None) -> bool:
        step = self.ctx.progress.step if step is None else step
        return self.every is not None and step % self.every == 0

    # -- hooks
    def after_backward(self) -> None: ...

    def after_step(self) -> None: ...

    def capture(self) -> None: ...

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
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

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

    def on_start(self) -> None:
        if "start" in self.at:
            self._capture_once()

    def on_epoch_end(self) -> None:
        if "epoch" in self.at:
            self._capture_once()

    def on_end(self) -> None:
        if "end" in self.at:
            self._capture_once()

    def _capture_once(self) -> None:
        step = self.ctx.progress.step
        if self._last_capture != step:
            self._last_capture = step
            self.capture()

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

    def select_modules(
        self, default: Callable[[LayerInfo], bool] | None = None
    ) -> list[tuple[str, nn.Module]]:
        """Tracked modules as (name, module), forward order; default: modules with parameters."""
        model = self.ctx.model
        rows = [r for r in self.ctx.layers if not r.param]
        has_params = {r.module for r in self.ctx.layers if r.param}
        default = default or (lambda r: r.module in has_params)
        return [(r.module, model.get_submodule(r.module)) for r in self.select(rows, default)]
