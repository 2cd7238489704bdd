"""How the features of layers correlate with each other on the probe batch (SPEC §5 `correlation`).

At each capture the fixed train probe batch goes through the model once in eval mode. Each
tracked module's output becomes [B, d]: outputs with spatial dimensions are averaged per channel
(`conv: pool`) or flattened whole (`conv: flatten`); a module with more than `max_features`
features keeps a seeded random subset of them, drawn once per run, so memory stays bounded and
every capture looks at the same features.

Recorded, for modules i ≤ j in forward order: `corr_mean` (one value per pair), `cka` (one value
per pair) and, at the captures in `save_full_at`, the full Pearson matrix `C` (d_i × d_j, row = i,
col = j). `save_full_at: [end]` means the last capture: the one after the final epoch.
"""

from __future__ import annotations

from typing import Any

import torch

from netprobe.errors import ConfigError
from netprobe.probes.base import AT_CHOICES, Probe, ProbeContext, _as_list
from netprobe.probes.module_outputs import (
    flatten_features,
    module_outputs,
    seeded_subset,
    to_float64,
)
from netprobe.structure import WEIGHT_TYPES

CONV_CHOICES = ("pool", "flatten")


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Each column of x [B, d] as z-scores over the batch (float64, population std).

    A constant column has no defined correlation; it becomes all zeros, so its correlation with
    every feature (itself included) is 0, never NaN.
    """
    x = to_float64(x)
    centered = x - x.mean(dim=0)
    std = centered.square().mean(dim=0).sqrt()
    return torch.where(std > 0, centered / torch.where(std > 0, std, 1.0), 0.0)


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """C_ij = Pearson correlation of feature i of a [B, d_a] with feature j of b [B, d_b] across
    the batch, as [d_a, d_b] in float64; 0 wherever either feature is constant."""
    return standardize(a).T @ standardize(b) / a.shape[0]


def mean_positive(c: torch.Tensor, same_layer: bool) -> torch.Tensor:
    """`corr_mean` = mean(max(C_ij, 0)). Within a layer (i = j) the diagonal, each feature with
    itself (trivially 1), is left out: the mean runs over the d(d−1) distinct pairs (0 if d = 1)."""
    positive = c.clamp(min=0)
    if not same_layer:
        return positive.mean()
    d = c.shape[0]
    off_diagonal = positive.sum() - positive.diagonal().sum()
    return off_diagonal / max(d * (d - 1), 1)


def linear_cka(features: list[torch.Tensor]) -> torch.Tensor:
    """Linear CKA between every pair of layers, [L, L] in float64.

    CKA(X, Y) = ‖Ycᵀ Xc‖²_F / (‖Xcᵀ Xc‖_F ‖Ycᵀ Yc‖_F) with Xc, Yc centred over the batch, computed
    through the B × B Gram matrices K = Xc Xcᵀ, as ⟨K_X, K_Y⟩ / (‖K_X‖ ‖K_Y‖). A layer whose
    features are all constant has K = 0; its CKA with everything is 0.
    """
    grams = []
    for x in features:
        xc = to_float64(x)
        xc = xc - xc.mean(dim=0)
        grams.append((xc @ xc.T).reshape(-1))
    k = torch.stack(grams)
    norms = torch.linalg.vector_norm(k, dim=1)
    k = k / torch.where(norms > 0, norms, 1.0)[:, None]
    return k @ k.T


class Correlation(Probe):
    """At start and each epoch: Pearson correlations and linear CKA between tracked layers."""

    name = "correlation"
    default_at = ("start", "epoch")
    options = {"conv": "pool", "max_features": 256, "save_full_at": ["start", "end"]}

    def __init__(self, ctx: ProbeContext, **cfg: Any) -> None:
        super().__init__(ctx, **cfg)
        if self.cfg["conv"] not in CONV_CHOICES:
            raise ConfigError(
                f"probes.{self.name}.conv={self.cfg['conv']!r}; valid: {', '.join(CONV_CHOICES)}"
            )
        k = self.cfg["max_features"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 2:
            raise ConfigError(f"probes.{self.name}.max_features={k!r} must be an integer ≥ 2")
        self.save_full_at = tuple(_as_list(self.cfg["save_full_at"]))
        for point in self.save_full_at:
            if point not in AT_CHOICES:
                raise ConfigError(
                    f"probes.{self.name}.save_full_at has {point!r}; valid: {', '.join(AT_CHOICES)}"
                )
        model = ctx.model
        self.modules = self.select_modules(
            lambda r: isinstance(model.get_submodule(r.module), WEIGHT_TYPES)
        )
        self._subsets: dict[str, torch.Tensor | None] = {}
        self._full_saved_at: int | None = None

    # -- schedule: `save_full_at` decides which captures also keep the full matrices
    def on_start(self) -> None:
        if "start" in self.at:
            self._capture_at("start")

    def on_epoch_end(self) -> None:
        if "epoch" in self.at:
            self._capture_at("epoch")

    def on_end(self) -> None:
        step = self.ctx.progress.step
        if "end" in self.at:
            self._capture_at("end")
        elif "end" in self.save_full_at and self._last_capture == step:
            # The last epoch's capture is the run's last: add its full matrices.
            self._capture_at("end", summary=False)

    def _capture_at(self, point: str, summary: bool = True) -> None:
        step = self.ctx.progress.step
        full = point in self.save_full_at and self._full_saved_at != step
        if summary and self._last_capture == step:
            summary = False
        if not (summary or full):
            return
        if summary:
            self._last_capture = step
        if full:
            self._full_saved_at = step
        self.record_correlations(summary=summary, full=full)

    def capture(self) -> None:
        self.record_correlations(summary=True, full=False)

    # -- measuring
    def features(self) -> tuple[list[str], list[torch.Tensor]]:
        """[B, d] features of each tracked module on the probe batch, forward order."""
        if self.ctx.probe_batch is None or not self.modules:
            return [], []
        conv = self.cfg["conv"]
        outs = module_outputs(
            self.ctx.model,
            self.modules,
            self.ctx.probe_batch[0],
            reduce=lambda y: flatten_features(y, conv),
        )
        names = [n for n, _ in self.modules if n in outs.values]
        return names, [self._subset(n, outs.values[n]) for n in names]

    def _subset(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """At most `max_features` columns: a random subset drawn once from the run's seed."""
        k, d = self.cfg["max_features"], x.shape[1]
        if name not in self._subsets:
            salt = 0xC022 + [n for n, _ in self.modules].index(name)
            pick = seeded_subset(d, k, self.ctx.generator(salt))
            self._subsets[name] = None if pick is None else pick.to(x.device)
        pick = self._subsets[name]
        return x if pick is None else x.index_select(1, pick)

    def record_correlations(self, summary: bool = True, full: bool = False) -> None:
        names, feats = self.features()
        if not names:
            return
        record = self.ctx.record
        if summary:
            cka = linear_cka(feats)
        z = [standardize(f) for f in feats]
        batch = feats[0].shape[0]
        means = []
        for i in range(len(names)):
            for j in range(i, len(names)):
                c = z[i].T @ z[j] / batch
                if summary:
                    means.append(mean_positive(c, same_layer=i == j))
                if full:
                    record.matrix(self.name, "C", names[i], names[j], c.to(torch.float32))
        if summary:
            rows, cols = torch.triu_indices(len(names), len(names), device=cka.device)
            values = torch.stack([torch.stack(means), cka[rows, cols]], dim=1)
            pairs = [(i, j) for i in range(len(names)) for j in range(i, len(names))]
            for (i, j), row in zip(pairs, values):
                record.matrix(self.name, "corr_mean", names[i], names[j], row[0:1])
                record.matrix(self.name, "cka", names[i], names[j], row[1:2])
