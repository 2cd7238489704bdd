"""Datasets the `data` config group builds, and the batches training draws from them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

from netprobe.data import vision as _vision
from netprobe.errors import ConfigError


@dataclass
class ImageData:
    """A whole dataset held as tensors: raw images [N, C, H, W] (uint8 or float) and labels [N].

    `normalize` maps a raw batch to the model's input: x / scale, then per-channel (x - mean) / std.
    Training augmentation pads by `crop_padding` pixels (default: an eighth of the side) before a
    random crop, and mirrors images only where `hflip` says a mirror image keeps its label.
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
    crop_padding: int | None = None
    hflip: bool = False

    def __post_init__(self) -> None:
        if self.mean is None or self.std is None:
            x = self.x_train.float() / self.scale
            self.mean = x.mean(dim=(0, 2, 3))
            self.std = x.std(dim=(0, 2, 3)).clamp_min(1e-6)
        if self.crop_padding is None:
            self.crop_padding = max(1, self.image_size // 8)
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def channels(self) -> int:
        return self.x_train.shape[1]

    @property
    def image_size(self) -> int:
        return self.x_train.shape[-1]

    @property
    def nbytes(self) -> int:
        tensors = (self.x_train, self.y_train, self.x_val, self.y_val)
        return sum(t.numel() * t.element_size() for t in tensors)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        # Cached per device: copying mean and std to the GPU at every batch would add two
        # host-to-device transfers per step.
        if x.device not in self._stats:
            self._stats[x.device] = (
                self.mean.to(x.device).view(1, -1, 1, 1),
                self.std.to(x.device).view(1, -1, 1, 1),
            )
        mean, std = self._stats[x.device]
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


def torchvision_data(cfg: Any) -> ImageData:
    """MNIST, Fashion-MNIST, CIFAR-10 or CIFAR-100 from torchvision's files under `cfg.root`.

    Validation is the official test split when `val_fraction` is null, else a seeded part of train.
    Normalization uses each data set's published mean and std, not statistics of this split.
    """
    spec = _vision.SETS[cfg.name]
    x_train, y_train, x_test, y_test = _vision.load(cfg)
    if cfg.val_fraction is None:
        parts = (x_train, y_train, x_test, y_test)
    else:
        parts = split(x_train, y_train, cfg.val_fraction, cfg.seed)
    return ImageData(
        cfg.name,
        *parts,
        spec.num_classes,
        scale=255.0,
        mean=torch.tensor(spec.mean),
        std=torch.tensor(spec.std),
        hflip=spec.hflip,
    )


BUILDERS = {
    "digits": digits,
    "synthetic": synthetic,
    **{name: torchvision_data for name in _vision.SETS},
}


def build_data(cfg: Any) -> ImageData:
    """The dataset named by `cfg.name`, held in memory."""
    if cfg.name not in BUILDERS:
        raise ConfigError(f"unknown data {cfg.name!r}; valid data options: {', '.join(BUILDERS)}")
    return BUILDERS[cfg.name](cfg)


def prepare_data(cfg: Any) -> None:
    """Check (or download) the files a data config needs, before any run directory exists."""
    if cfg.name in _vision.SETS:
        _vision.prepare(cfg)


def keep_on_device(setting: bool | None, data: ImageData, device: torch.device) -> bool:
    """Whether to hold the whole data set on `device`: `data.on_device`, or when null, on a GPU
    where it takes less than a quarter of the free memory (leaving room for the model)."""
    if setting is not None:
        return bool(setting)
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return data.nbytes < free / 4


class Batches:
    """Shuffled training batches or ordered validation batches, normalized, on `device`.

    With `on_device`, the whole split lives on the device and batches are drawn by index; otherwise
    a DataLoader feeds the device. Both take their indices from one seeded `IndexBatches`, so
    they give the same batches. With `augment`, every batch is randomly cropped and (where the
    data allows) mirrored on the device, the same way for both. Under DDP, `batch_size` is the
    global batch and this process (`rank` of `world_size`) gets its equal share of each one.
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
        augment: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.data = data
        x, y = (data.x_train, data.y_train) if split == "train" else (data.x_val, data.y_val)
        self.batch_size, self.device, self.shuffle = batch_size, device, shuffle
        self.on_device, self.drop_last, self.augment = on_device, drop_last, augment
        self.generator = torch.Generator().manual_seed(seed)
        self.sampler = IndexBatches(
            len(x), batch_size, shuffle, drop_last, self.generator, rank, world_size
        )
        # Drawn on the device so that augmenting a batch never waits on a host-to-device copy;
        # a generator of its own, so turning augmentation on leaves the shuffling order unchanged.
        # Each rank crops its own share differently; rank 0 crops as a single process does.
        self.augment_generator = torch.Generator(device=device).manual_seed(seed + 1 + 7919 * rank)
        if on_device:
            self.x, self.y = x.to(device), y.to(device)
        else:
            self.loader = DataLoader(
                TensorDataset(x, y),
                # Whole batches of indices: one tensor gather per batch, not one per sample.
                sampler=self.sampler,
                batch_size=None,
                num_workers=num_workers,
                pin_memory=device.type == "cuda",
                persistent_workers=num_workers > 0,
                # The loader seeds its workers from this, not from the global RNG, so both paths
                # leave the global RNG (dropout, ...) in the same state.
                generator=torch.Generator().manual_seed(seed),
            )
        self.n = len(x)

    def __len__(self) -> int:
        return len(self.sampler)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Where the shuffling and augmentation draws are, for resuming at an epoch boundary."""
        return {
            "sampler": self.generator.get_state(),
            "augment": self.augment_generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["sampler"])
        self.augment_generator.set_state(state["augment"])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self._raw():
            if self.augment:
                x = random_crop_flip(
                    x, self.data.crop_padding, self.data.hflip, self.augment_generator
                )
            yield self.data.normalize(x), y

    def _raw(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not self.on_device:
            for x, y in self.loader:
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            return
        # One host-to-device copy of the epoch's order; each batch is then a slice on the device.
        order = self.sampler.epoch_order().to(self.device)
        for batch in self.sampler.slices():
            idx = order[batch]
            yield self.x[idx], self.y[idx]


class IndexBatches(Sampler[torch.Tensor]):
    """The index batches of one epoch: a fresh permutation from `generator` (or 0..n-1 in order)
    cut into `batch_size` pieces. Both data paths read their batches from here.

    Under DDP every rank draws the same permutation (same seed) and takes the `rank`-th of
    `world_size` equal contiguous parts of each batch, as DistributedSampler shards an epoch; a
    last batch too small to split evenly loses its remainder, so all ranks step together.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        shuffle: bool,
        drop_last: bool,
        generator: torch.Generator,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size % world_size:
            raise ConfigError(
                f"data.batch_size={batch_size} must be a multiple of the {world_size} processes: "
                "it is the global batch, split evenly between them"
            )
        self.n, self.batch_size, self.shuffle, self.drop_last = n, batch_size, shuffle, drop_last
        self.generator = generator
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full if self.drop_last or rest < self.world_size else full + 1

    def epoch_order(self) -> torch.Tensor:
        # Exactly one draw per epoch; RandomSampler draws a second, empty-sliced permutation at
        # the end of each epoch, which would make the two paths drift apart from epoch 2 on.
        if self.shuffle:
            return torch.randperm(self.n, generator=self.generator)
        return torch.arange(self.n)

    def slices(self) -> Iterator[slice]:
        for i in range(len(self)):
            start = i * self.batch_size
            share = min(self.batch_size, self.n - start) // self.world_size
            yield slice(start + self.rank * share, start + (self.rank + 1) * share)

    def __iter__(self) -> Iterator[torch.Tensor]:
        order = self.epoch_order()
        for batch in self.slices():
            yield order[batch]


def random_crop_flip(
    x: torch.Tensor, padding: int, flip: bool, generator: torch.Generator
) -> torch.Tensor:
    """Per sample of x [B, C, H, W]: zero-pad by `padding`, crop back to H x W at a random offset
    and, with `flip`, mirror left-right with probability 1/2; one gather for the whole batch.
    """
    b, c, h, w = x.shape
    dev = x.device
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (b, 1), device=dev, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (b, 1), device=dev, generator=generator)
    rows = dy + torch.arange(h, device=dev)  # [B, H]
    cols = dx + torch.arange(w, device=dev)  # [B, W]
    if flip:
        mirrored = torch.rand(b, 1, device=dev, generator=generator) < 0.5
        cols = torch.where(mirrored, cols.flip(1), cols)
    return padded[
        torch.arange(b, device=dev).view(b, 1, 1, 1),
        torch.arange(c, device=dev).view(1, c, 1, 1),
        rows.view(b, 1, h, 1),
        cols.view(b, 1, 1, w),
    ]


def fixed_batch(
    data: ImageData, split: str, size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `size` samples of a split, normalized: the same probe batch at every capture."""
    x, y = (data.x_train, data.y_train) if split == "train" else (data.x_val, data.y_val)
    return data.normalize(x[:size].to(device)), y[:size].to(device)
