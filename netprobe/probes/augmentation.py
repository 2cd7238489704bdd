"""How stable the first and last layers' features are under augmentation (SPEC §5 `augmentation`).

One fixed validation sample is transformed `samples` (N = 300) times by random affine maps
(rotation ±`rotation`°, translation ±`translate` of the width and height, scale in `scale`),
drawn from the run's seed and applied on the device with `affine_grid` / `grid_sample`. The
augmented images go through the model in eval mode, in chunks of `chunk`. For the first and the
last tracked module (default: conv and linear layers), whose outputs become [N, d] as in
`correlation` (`conv`, `max_features`):

- `feature_corr`: Pearson correlation between features across the N augmentations, d × d;
- `sample_corr`: Pearson correlation between augmentations across the features, N × N;
- `invariance` (a scalar): the mean per-feature variance across augmentations divided by the mean
  per-feature variance across the probe batch (0: the features ignore the transformation, 1: it
  moves them as much as changing the image does).

`original` (the untouched sample) and `inputs` (the first `show` augmented images) are stored too,
so the figure of augmented inputs reads only the store.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from netprobe.errors import ConfigError
from netprobe.probes.base import Probe, ProbeContext, StepState
from netprobe.probes.correlation import CONV_CHOICES, feature_count, pearson
from netprobe.probes.module_outputs import (
    flatten_features,
    module_outputs,
    seeded_subset,
    to_float64,
)
from netprobe.probes.schedule import Schedule
from netprobe.structure import WEIGHT_TYPES

PADDING_CHOICES = ("border", "zeros", "reflection")


def affine_theta(
    angle: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    height: int,
    width: int,
) -> torch.Tensor:
    """`affine_grid` matrices [n, 2, 3] that rotate by `angle` (degrees), scale by `scale` and then
    shift by `shift` [n, 2] (fractions of width and height) about the image centre.

    The output-to-input map is the inverse, p_in = R(−a)(p_out − t)/s in pixel units, written in
    the normalized coordinates of `affine_grid` (x over the width, y over the height, each in
    [−1, 1]), so non-square images rotate without shearing.
    """
    a = torch.deg2rad(angle)
    cos, sin = torch.cos(a), torch.sin(a)
    aspect = height / width
    inv = (
        torch.stack(
            [
                torch.stack([cos, sin * aspect], dim=-1),
                torch.stack([-sin / aspect, cos], dim=-1),
            ],
            dim=-2,
        )
        / scale[:, None, None]
    )
    t = 2 * shift  # a fraction f of the width is 2f in normalized units
    offset = -(inv @ t[:, :, None])
    return torch.cat([inv, offset], dim=2)


def augment(x: torch.Tensor, theta: torch.Tensor, padding: str = "border") -> torch.Tensor:
    """The image x [C, H, W] transformed by each of theta [n, 2, 3]: [n, C, H, W]."""
    n = theta.shape[0]
    grid = F.affine_grid(theta.to(x.dtype), [n, *x.shape], align_corners=False)
    return F.grid_sample(
        x.expand(n, *x.shape), grid, mode="bilinear", padding_mode=padding, align_corners=False
    )


def invariance(augmented: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """mean_k Var_aug(f_k) / mean_k Var_batch(f_k) for features [N, d] and [B, d] (population
    variances, float64); 0 when the features do not vary across the probe batch either."""
    var_aug = to_float64(augmented).var(dim=0, correction=0).mean()
    var_batch = to_float64(batch).var(dim=0, correction=0).mean()
    return torch.where(var_batch > 0, var_aug / torch.where(var_batch > 0, var_batch, 1.0), 0.0)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Augmentation(Probe):
    """At the end: correlations and invariance of features under random affine augmentation."""

    name = "augmentation"
    measures = "feature and sample correlations and invariance under random affine transforms"
    default_schedule = Schedule(at=("end",))
    options = {
        "samples": 300,
        "sample_index": 0,
        "rotation": 15.0,
        "translate": 0.1,
        "scale": [0.9, 1.1],
        "padding": "border",
        "conv": "pool",
        "max_features": 256,
        "chunk": 100,
        "show": 16,
    }

    def __init__(self, ctx: ProbeContext, **cfg: Any) -> None:
        super().__init__(ctx, **cfg)
        self._check()
        model = ctx.model
        tracked = self.select_modules(
            lambda r: isinstance(model.get_submodule(r.module), WEIGHT_TYPES)
        )
        # The first and the last tracked module (one, if only one is tracked).
        self.modules = tracked[:1] + tracked[-1:] if len(tracked) > 1 else tracked
        self._subsets: dict[str, torch.Tensor | None] = {}

    def memory_estimate(self) -> tuple[int, str]:
        """Per measured module: its features over the N augmentations and the probe batch
        (float32), `feature_corr` (d × d) and `sample_corr` (N × N) held for the flush and copied
        to the host there (24 bytes a value), and the float64 work of the larger Pearson."""
        batch = self.ctx.valid_batch if self.ctx.valid_batch is not None else self.ctx.probe_batch
        if batch is None or not self.modules:
            return 0, ""
        n, b, k = self.cfg["samples"], len(batch[0]), self.cfg["max_features"]
        shapes = self.module_shapes()
        dims = [min(feature_count(shapes[m], self.cfg["conv"]), k) for m, _ in self.modules]
        features = sum(4 * (n + b) * d + 24 * d * d + 16 * n * d for d in dims)
        samples = sum(24 * n * n for _ in dims)
        work = 12 * max(max(dims) ** 2, n * n)
        lower = "max_features" if max(dims) ** 2 >= n * n else "samples"
        return features + samples + work, f"probes.{self.name}.{lower}"

    def _check(self) -> None:
        c, name = self.cfg, self.name
        for key, low in (("samples", 2), ("chunk", 1), ("max_features", 2), ("show", 0)):
            v = c[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"probes.{name}.{key}={v!r} must be an integer ≥ {low}")
        if not _number(c["rotation"]) or not 0 <= c["rotation"] <= 180:
            raise ConfigError(
                f"probes.{name}.rotation={c['rotation']!r} must be degrees in [0, 180]"
            )
        if not _number(c["translate"]) or not 0 <= c["translate"] < 1:
            raise ConfigError(
                f"probes.{name}.translate={c['translate']!r} must be a fraction in [0, 1)"
            )
        scale = c["scale"]
        if (
            not isinstance(scale, (list, tuple))
            or len(scale) != 2
            or not all(_number(s) and s > 0 for s in scale)
            or scale[0] > scale[1]
        ):
            raise ConfigError(
                f"probes.{name}.scale={scale!r} must be [low, high] with 0 < low ≤ high"
            )
        if c["padding"] not in PADDING_CHOICES:
            raise ConfigError(
                f"probes.{name}.padding={c['padding']!r}; valid: {', '.join(PADDING_CHOICES)}"
            )
        if c["conv"] not in CONV_CHOICES:
            raise ConfigError(f"probes.{name}.conv={c['conv']!r}; valid: {', '.join(CONV_CHOICES)}")
        source = self.ctx.valid_batch if self.ctx.valid_batch is not None else self.ctx.probe_batch
        index = c["sample_index"]
        size = len(source[0]) if source is not None else None
        if (
            isinstance(index, bool)
            or not isinstance(index, int)
            or index < 0
            or (size is not None and index >= size)
        ):
            raise ConfigError(
                f"probes.{name}.sample_index={index!r} must be an index into the validation "
                f"batch (0 to {size - 1 if size else 0})"
            )

    # -- measuring
    def sample(self) -> torch.Tensor | None:
        """The fixed validation sample [C, H, W] (the train probe batch's when there is none)."""
        source = self.ctx.valid_batch if self.ctx.valid_batch is not None else self.ctx.probe_batch
        return None if source is None else source[0][self.cfg["sample_index"]]

    def transforms(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """The N random affine matrices, the same at every capture of the run."""
        c, n = self.cfg, self.cfg["samples"]
        gen = self.ctx.generator(salt=0xA06, device=device)
        u = torch.rand(n, 4, generator=gen, device=device)
        angle = (2 * u[:, 0] - 1) * c["rotation"]
        shift = (2 * u[:, 1:3] - 1) * c["translate"]
        low, high = c["scale"]
        scale = low + (high - low) * u[:, 3]
        return affine_theta(angle, shift, scale, height, width)

    def augmented(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The augmented images of sample x, in chunks of at most `chunk`."""
        theta = self.transforms(x.shape[-2], x.shape[-1], x.device)
        return [augment(x, t, self.cfg["padding"]) for t in theta.split(self.cfg["chunk"])]

    def features(self, images: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """[n, d] features of each module over the chunks of images, concatenated."""
        conv = self.cfg["conv"]
        parts: dict[str, list[torch.Tensor]] = {}
        for chunk in images:
            outs = module_outputs(
                self.ctx.model,
                self.modules,
                chunk,
                reduce=lambda name, y: self._subset(name, flatten_features(y, conv)),
            )
            for name, value in outs.values.items():
                parts.setdefault(name, []).append(value)
        return {name: torch.cat(values) for name, values in parts.items()}

    def _subset(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if name not in self._subsets:
            salt = 0xA07 + [n for n, _ in self.modules].index(name)
            pick = seeded_subset(x.shape[1], self.cfg["max_features"], self.ctx.generator(salt))
            self._subsets[name] = None if pick is None else pick.to(x.device)
        pick = self._subsets[name]
        return x if pick is None else x.index_select(1, pick)

    def capture(self, state: StepState) -> None:
        x = self.sample()
        if x is None or not self.modules or x.ndim != 3:
            return
        images = self.augmented(x)
        augmented = self.features(images)
        probe = self.ctx.probe_batch
        batch = self.features(list(probe[0].split(self.cfg["chunk"]))) if probe else {}
        record = self.ctx.record
        names = [n for n, _ in self.modules if n in augmented]
        for name in names:
            f = augmented[name]
            record.matrix(self.name, "feature_corr", name, name, pearson(f, f).float())
            record.matrix(self.name, "sample_corr", name, name, pearson(f.T, f.T).float())
        if batch:
            values = torch.stack([invariance(augmented[n], batch[n]) for n in names])
            record.scalars(self.name, names, ["invariance"], values[:, None])
        show = min(self.cfg["show"], self.cfg["samples"])
        record.matrix(self.name, "original", "", "", x)
        if show:
            first = torch.cat(images[: -(-show // self.cfg["chunk"])])[:show]
            record.matrix(self.name, "inputs", "", "", first)
