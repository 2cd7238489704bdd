"""How the features of tracked layers correlate on the probe batch (SPEC §5 `correlation`):
`corr_mean` and linear CKA per pair of layers, and the full Pearson matrices `C` at the captures
in `save_full_at`."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from netprobe.errors import ConfigError
from netprobe.probes.base import Probe, ProbeContext, StepState
from netprobe.probes.capture import FEATURE_OPTIONS, Features
from netprobe.probes.options import Option
from netprobe.probes.reductions import to_float64
from netprobe.probes.schedule import AT_CHOICES, Schedule
from netprobe.structure import WEIGHT_TYPES

CKA_CHOICES = ("biased", "unbiased", "both")
# The matrix each CKA estimator is stored as.
CKA_NAMES = {"biased": "cka", "unbiased": "cka_unbiased"}
# Feature columns per block: a Pearson block is at most BLOCK × BLOCK float64 values (32 MB), so
# no capture ever makes a whole d_i × d_j matrix in float64.
BLOCK = 2048


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


def correlate(
    za: torch.Tensor, zb: torch.Tensor, same_layer: bool, keep: bool = False, block: int = BLOCK
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`corr_mean` = mean(max(C_ij, 0)) of C = za zbᵀ/B for z-scores za [B, d_a], zb [B, d_b]
    (`standardize`), and C itself in float32 when `keep`; C is made block × block at a time.

    Within a layer (i = j) the diagonal, each feature with itself (trivially 1), is left out: the
    mean runs over the d(d−1) distinct pairs (0 if d = 1).
    """
    (n, d_a), d_b = za.shape, zb.shape[1]
    total = torch.zeros((), dtype=torch.float64, device=za.device)
    full = torch.empty(d_a, d_b, dtype=torch.float32, device=za.device) if keep else None
    for r in range(0, d_a, block):
        for c in range(0, d_b, block):
            part = za[:, r : r + block].T @ zb[:, c : c + block] / n
            positive = part.clamp(min=0)
            total += positive.sum()
            if same_layer and r == c:
                total -= positive.diagonal().sum()
            if full is not None:
                full[r : r + part.shape[0], c : c + part.shape[1]] = part
    count = d_a * (d_a - 1) if same_layer else d_a * d_b
    return total / max(count, 1), full


def gram_matrices(features: list[torch.Tensor], block: int = BLOCK) -> torch.Tensor:
    """K = Xc Xcᵀ [L, B, B] (float64) of each layer's features X [B, d] centred over the batch,
    summed over blocks of columns so no layer is copied to float64 whole."""
    grams = []
    for x in features:
        k = torch.zeros(x.shape[0], x.shape[0], dtype=torch.float64, device=x.device)
        for c in range(0, x.shape[1], block):
            xc = to_float64(x[:, c : c + block])
            xc = xc - xc.mean(dim=0)
            k += xc @ xc.T
        grams.append(k)
    return torch.stack(grams)


def hsic_biased(grams: torch.Tensor) -> torch.Tensor:
    """HSIC_0(K_i, K_j) = tr(K_i H K_j H)/(n−1)² for every pair [L, L], from Gram matrices of
    centred features (H K H = K then), as ⟨K_i, K_j⟩_F/(n−1)²."""
    n = grams.shape[-1]
    flat = grams.reshape(len(grams), -1)
    return flat @ flat.T / (n - 1) ** 2


def hsic_unbiased(grams: torch.Tensor) -> torch.Tensor:
    """The unbiased HSIC_1 of Song et al. (2012) for every pair [L, L] (n ≥ 4 samples): with K̃
    the Gram matrix with its diagonal set to 0,
    HSIC_1(K, L) = [tr(K̃L̃) + 1ᵀK̃1 · 1ᵀL̃1 / ((n−1)(n−2)) − 2/(n−2) · 1ᵀK̃L̃1] / (n(n−3))."""
    n = grams.shape[-1]
    k = grams.clone()
    k.diagonal(dim1=1, dim2=2).zero_()
    flat = k.reshape(len(k), -1)
    sums = k.sum(dim=2)  # K̃1 per layer; 1ᵀK̃L̃1 = (K̃1)ᵀ(L̃1) as K̃ is symmetric
    totals = sums.sum(dim=1)
    hsic = flat @ flat.T + totals[:, None] * totals[None, :] / ((n - 1) * (n - 2))
    return (hsic - 2 / (n - 2) * (sums @ sums.T)) / (n * (n - 3))


def linear_cka(features: list[torch.Tensor], unbiased: bool = False) -> torch.Tensor:
    """Linear CKA between every pair of layers, [L, L] in float64:
    CKA(X, Y) = HSIC(K_X, K_Y) / √(HSIC(K_X, K_X) HSIC(K_Y, K_Y)) with K = X Xᵀ.

    `unbiased=False` uses HSIC_0 (`hsic_biased`), for which CKA = ‖Ycᵀ Xc‖²_F / (‖Xcᵀ Xc‖_F
    ‖Ycᵀ Yc‖_F); `unbiased=True` the debiased HSIC_1 (`hsic_unbiased`; Nguyen et al. 2021).
    A layer whose own HSIC is not positive (constant features) has CKA 0 with everything.
    """
    return cka_from_grams(gram_matrices(features), unbiased)


def cka_from_grams(grams: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """`linear_cka` from the layers' Gram matrices [L, B, B] (`gram_matrices`)."""
    hsic = hsic_unbiased(grams) if unbiased else hsic_biased(grams)
    self_hsic = hsic.diagonal()
    scale = torch.where(self_hsic > 0, self_hsic, 1.0).sqrt()
    valid = (self_hsic > 0)[:, None] & (self_hsic > 0)[None, :]
    return torch.where(valid, hsic / (scale[:, None] * scale[None, :]), 0.0)


class Correlation(Probe):
    """At start and each epoch: Pearson correlations and linear CKA between tracked layers."""

    name = "correlation"
    measures = "corr_mean and linear CKA per pair of layers (and full C matrices)"
    default_schedule = Schedule(at=("start", "epoch"))
    options = (
        *FEATURE_OPTIONS,
        # Captures that also keep every C_ij; `end` is the last one, the one after the final epoch.
        Option("save_full_at", list, ["start", "end"], choices=AT_CHOICES),
        Option("cka", str, "biased", choices=CKA_CHOICES),
    )

    def __init__(self, ctx: ProbeContext, **cfg: Any) -> None:
        super().__init__(ctx, **cfg)
        self.save_full_at = tuple(self.cfg["save_full_at"])
        # `save_full_at: [end]` adds the full matrices to the run's last capture: called at end.
        self.summary_at = self.schedule.at
        if "end" in self.save_full_at and "end" not in self.summary_at:
            self.schedule = replace(self.schedule, at=(*self.summary_at, "end"))
        full = ", ".join(self.save_full_at).replace("end", "end (the last capture)")
        at = ", ".join(self.summary_at)
        self.measures = f"corr_mean and CKA per pair of layers at {at}; full C at {full or 'none'}"
        cka = self.cfg["cka"]
        self.estimators = ["biased", "unbiased"] if cka == "both" else [cka]
        batch = ctx.probe_batch
        if "unbiased" in self.estimators and batch is not None and len(batch[0]) < 4:
            raise ConfigError(
                f"probes.{self.name}.cka={cka!r}: the unbiased estimator needs a probe batch of "
                f"at least 4 samples, not {len(batch[0])} (data.probe_size); or use cka=biased"
            )
        model = ctx.model
        self.modules = self.select_modules(
            lambda r: isinstance(model.get_submodule(r.module), WEIGHT_TYPES)
        )
        self.extract = Features(
            self.modules, self.cfg["conv"], self.cfg["max_features"], ctx.generator, salt=0xC022
        )

    def memory_estimate(self) -> tuple[int, str]:
        """Features [B, d_i] of every layer (float32) and their z-scores (float64), one block of
        C_ij and its clamp, the L Gram matrices (B × B, float64, twice for the unbiased
        estimator) and, at captures in `save_full_at`, every C_ij (float32) while it waits for
        the flush and is copied to the host there (24 bytes a value in all)."""
        if self.ctx.probe_batch is None or not self.modules:
            return 0, ""
        b = len(self.ctx.probe_batch[0])
        dims = self.extract.dims(self.module_shapes())
        side = min(max(dims), BLOCK)
        parts = {
            f"probes.{self.name}.max_features": 12 * b * sum(dims) + 16 * side * side,
            "data.probe_size": 8 * b * b * (len(dims) * (1 + len(self.estimators)) + 1)
            + 8 * b * side,
        }
        if self.save_full_at:
            full = 24 * sum(d * e for i, d in enumerate(dims) for e in dims[i:])
            parts[f"probes.{self.name}.max_features or probes.{self.name}.save_full_at=[]"] = full
        return sum(parts.values()), max(parts, key=parts.get)

    def at_point(self, state: StepState) -> None:
        """The correlations at the `at` points, once per step, and the full matrices at the
        `save_full_at` points, `end` meaning the run's last capture, whichever point took it."""
        last, point = self.last_capture, state.point
        again = last is not None and last[0] == state.step
        summary = point in self.summary_at and not again
        # At a step already captured: the full matrices unless that capture stored them.
        stored = again and last[1] in self.save_full_at
        full = point in self.save_full_at and (summary or (again and not stored))
        if summary or full:
            self.last_capture = (state.step, point)
            self.record_correlations(summary=summary, full=full)

    def capture(self, state: StepState) -> None:
        self.record_correlations(summary=True, full=False)

    # -- measuring
    def features(self) -> tuple[list[str], list[torch.Tensor]]:
        """[B, d] features of each tracked module on the probe batch, forward order."""
        if self.ctx.probe_batch is None or not self.modules:
            return [], []
        values = self.extract(self.ctx.model, self.ctx.probe_batch[0])
        return list(values), list(values.values())

    def record_correlations(self, summary: bool = True, full: bool = False) -> None:
        """For every pair of tracked modules i ≤ j in forward order (row = i, col = j): `corr_mean`
        and CKA (`cka`, `cka_unbiased` as `cka` says) with `summary`, the matrix `C` with `full`.
        C_ij and the Gram matrices are built BLOCK features at a time."""
        names, feats = self.features()
        if not names:
            return
        record = self.ctx.record
        pairs = [(i, j) for i in range(len(names)) for j in range(i, len(names))]
        z = [standardize(f) for f in feats]
        means = []
        for i, j in pairs:
            mean, c = correlate(z[i], z[j], same_layer=i == j, keep=full, block=BLOCK)
            means.append(mean)
            if c is not None:
                record.matrix(self.name, "C", names[i], names[j], c)
        if not summary:
            return
        grams = gram_matrices(feats, BLOCK)
        rows, cols = torch.triu_indices(len(names), len(names), device=grams.device)
        values = {"corr_mean": torch.stack(means)}
        for estimator in self.estimators:
            cka = cka_from_grams(grams, unbiased=estimator == "unbiased")
            values[CKA_NAMES[estimator]] = cka[rows, cols]
        for p, (i, j) in enumerate(pairs):
            for name, v in values.items():
                record.matrix(self.name, name, names[i], names[j], v[p : p + 1])
