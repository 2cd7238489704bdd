"""How stable the first and last tracked layers' features are under random affine augmentation
of one fixed validation sample (SPEC §5 `augmentation`): `feature_corr`, `sample_corr` and
`invariance`."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from netprobe.config import is_number
from netprobe.errors import ConfigError
from netprobe.probes.base import Probe, ProbeContext, StepState
from netprobe.probes.capture import FEATURE_OPTIONS, Features
from netprobe.probes.correlation import pearson
from netprobe.probes.options import Option
from netprobe.probes.reductions import to_float64
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
    variances, float64): 0 when the features ignore the transformation, 1 when it moves them as
    much as changing the image does; 0 when they do not vary across the probe batch either."""
    var_aug = to_float64(augmented).var(dim=0, correction=0).mean()
    var_batch = to_float64(batch).var(dim=0, correction=0).mean()
    return torch.where(var_batch > 0, var_aug / torch.where(var_batch > 0, var_batch, 1.0), 0.0)


def _scale_range(value: Any) -> bool:
    """[low, high] with 0 < low ≤ high."""
    return (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(is_number(s) and s > 0 for s in value)
        and value[0] <= value[1]
    )


class Augmentation(Probe):
    """At the end: correlations and invariance of features under random affine augmentation."""

    name = "augmentation"
    measures = "feature and sample correlations and invariance under random affine transforms"
    default_schedule = Schedule(at=("end",))
    options = (
        Option("samples", int, 300, low=2),
        Option("sample_index", int, 0, low=0),
        Option("rotation", float, 15.0, low=0, high=180, note="degrees"),
        Option("translate", float, 0.1, low=0, high=1, open=True, note="a share of the size"),
        Option(
            "scale",
            list,
            [0.9, 1.1],
            check=_scale_range,
            expected="[low, high] with 0 < low ≤ high",
        ),
        Option("padding", str, "border", choices=PADDING_CHOICES),
        *FEATURE_OPTIONS,
        Option("chunk", int, 100, low=1),
        Option("show", int, 16, low=0),
    )

    def __init__(self, ctx: ProbeContext, **cfg: Any) -> None:
        super().__init__(ctx, **cfg)
        self._check_sample_index()
        model = ctx.model
        tracked = self.select_modules(
            lambda r: isinstance(model.get_submodule(r.module), WEIGHT_TYPES)
        )
        # The first and the last tracked module (one, if only one is tracked).
        self.modules = tracked[:1] + tracked[-1:] if len(tracked) > 1 else tracked
        self.extract = Features(
            self.modules, self.cfg["conv"], self.cfg["max_features"], ctx.generator, salt=0xA07
        )

    def memory_estimate(self) -> tuple[int, str]:
        """Per measured module: its features over the N augmentations and the probe batch
        (float32), `feature_corr` (d × d) and `sample_corr` (N × N) held for the flush and copied
        to the host there (24 bytes a value), and the float64 work of the larger Pearson."""
        batch = self.ctx.valid_batch if self.ctx.valid_batch is not None else self.ctx.probe_batch
        if batch is None or not self.modules:
            return 0, ""
        n, b = self.cfg["samples"], len(batch[0])
        dims = self.extract.dims(self.module_shapes())
        features = sum(4 * (n + b) * d + 24 * d * d + 16 * n * d for d in dims)
        samples = sum(24 * n * n for _ in dims)
        work = 12 * max(max(dims) ** 2, n * n)
        lower = "max_features" if max(dims) ** 2 >= n * n else "samples"
        return features + samples + work, f"probes.{self.name}.{lower}"

    def _check_sample_index(self) -> None:
        source = self.ctx.valid_batch if self.ctx.valid_batch is not None else self.ctx.probe_batch
        index = self.cfg["sample_index"]
        if source is not None and index >= len(source[0]):
            raise ConfigError(
                f"probes.{self.name}.sample_index={index!r} must be an index into the validation "
                f"batch (0 to {len(source[0]) - 1})"
            )

    # -- measuring
    def sample(self) -> torch.Tensor | None:
        """The fixed validation sample [C, H, W] (the train probe batch's when there is none)."""
        source = self.ctx.valid_batch if self.ctx.valid_batch is not None else self.ctx.probe_batch
        return None if source is None else source[0][self.cfg["sample_index"]]

    def transforms(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """The N = `samples` random affine matrices, the same at every capture of the run, drawn
        from the run's seed: rotation in ±`rotation`°, translation in ±`translate` of the width and
        height, scale in [low, high] = `scale`."""
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
        parts: dict[str, list[torch.Tensor]] = {}
        for chunk in images:
            for name, value in self.extract(self.ctx.model, chunk).items():
                parts.setdefault(name, []).append(value)
        return {name: torch.cat(values) for name, values in parts.items()}

    def capture(self, state: StepState) -> None:
        """The N augmented images go through the model in eval mode, `chunk` at a time; for the
        first and last tracked module, whose outputs become [N, d] features (`conv`,
        `max_features`): `feature_corr`, the Pearson correlation between features across the
        augmentations (d × d), `sample_corr`, between augmentations across the features (N × N),
        and `invariance`. `original` and the first `show` augmented `inputs` are stored too, so
        that their figure reads only the store."""
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
