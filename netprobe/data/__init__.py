"""Datasets the `data` config group builds, and the batches training draws from them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from netprobe.errors import ConfigError


@dataclass
class ImageData:
    """A whole dataset held as tensors: raw images [N, C, H, W] (uint8 or float) and labels [N].

    `normalize` maps a raw batch to the model's input: x / scale, then per-channel (x - mean) / std.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    num_classes: int
    scale: float = 1.0
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.mean is None or self.std is None:
            x = self.x_train.float() / self.scale
            self.mean = x.mean(dim=(0, 2, 3))
            self.std = x.std(dim=(0, 2, 3)).clamp_min(1e-6)

    @property
    def channels(self) -> int:
        return self.x_train.shape[1]

    @property
    def image_size(self) -> int:
        return self.x_train.shape[-1]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = self.mean.to(x.device).view(1, -1, 1, 1)
        std = self.std.to(x.device).view(1, -1, 1, 1)
        return (x.float() / self.scale - mean) / std


def split(
    x: torch.Tensor, y: torch.Tensor, val_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A seeded random split into train and validation parts."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    n_val = max(1, round(len(x) * val_fraction))
    val, train = perm[:n_val], perm[n_val:]
    return x[train], y[train], x[val], y[val]


def digits(cfg: Any) -> ImageData:
    """scikit-learn's bundled 8×8 digits: pixel values 0..16, 10 classes."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1)
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    return ImageData("digits", *split(x, y, cfg.val_fraction or 0.2, cfg.seed), 10, scale=16.0)


def synthetic(cfg: Any) -> ImageData:
    """Class-conditional images: a smooth random pattern per class plus Gaussian noise, seeded.

    Patterns are drawn at low resolution and upsampled, so conv nets have spatial structure.
    """
    g = torch.Generator().manual_seed(cfg.seed)
    c, s, k, n = cfg.channels, cfg.image_size, cfg.num_classes, cfg.num_samples
    coarse = torch.randn(k, c, 4, 4, generator=g)
    patterns = torch.nn.functional.interpolate(coarse, size=(s, s), mode="bilinear")
    y = torch.randint(0, k, (n,), generator=g)
    x = patterns[y] + cfg.noise * torch.randn(n, c, s, s, generator=g)
    return ImageData("synthetic", *split(x, y, cfg.val_fraction or 0.2, cfg.seed), k)


BUILDERS = {"digits": digits, "synthetic": synthetic}


def build_data(cfg: Any) -> ImageData:
    """The dataset named by `cfg.name`, held in memory."""
    if cfg.name not in BUILDERS:
        raise ConfigError(f"unknown data {cfg.name!r}; valid data options: {', '.join(BUILDERS)}")
    return BUILDERS[cfg.name](cfg)


class Batches:
    """Shuffled training batches or ordered validation batches, normalized, on `device`.

    With `on_device`, the whole split lives on the device and batches are drawn by index; otherwise
    a DataLoader with a seeded RandomSampler feeds the device. Both draw the same permutation
    from the same generator, so they give the same batches.
    """

    def __init__(
        self,
        data: ImageData,
        split: str,
        batch_size: int,
        device: torch.device,
        *,
        shuffle: bool,
        seed: int = 0,
        on_device: bool = False,
        num_workers: int = 0,
        drop_last: bool = False,
    ) -> None:
        self.data = data
        x, y = (data.x_train, data.y_train) if split == "train" else (data.x_val, data.y_val)
        self.batch_size, self.device, self.shuffle = batch_size, device, shuffle
        self.on_device, self.drop_last = on_device, drop_last
        self.generator = torch.Generator().manual_seed(seed)
        if on_device:
            self.x, self.y = x.to(device), y.to(device)
        else:
            sampler = RandomSampler(x, generator=self.generator) if shuffle else None
            self.loader = DataLoader(
                TensorDataset(x, y),
                batch_size=batch_size,
                sampler=sampler,
                num_workers=num_workers,
                drop_last=drop_last,
                pin_memory=device.type == "cuda",
                persistent_workers=num_workers > 0,
            )
        self.n = len(x)

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self._raw():
            yield self.data.normalize(x), y

    def _raw(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not self.on_device:
            for x, y in self.loader:
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            return
        order = (
            torch.randperm(self.n, generator=self.generator).to(self.device)
            if self.shuffle
            else torch.arange(self.n, device=self.device)
        )
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield self.x[idx], self.y[idx]


def fixed_batch(
    data: ImageData, split: str, size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `size` samples of a split, normalized: the same probe batch at every capture."""
    x, y = (data.x_train, data.y_train) if split == "train" else (data.x_val, data.y_val)
    return data.normalize(x[:size].to(device)), y[:size].to(device)
