"""MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100, read by torchvision's own dataset classes.

The files stay in torchvision's on-disk layout under `data.root`; `data.download=true` fetches
them. A missing data set is a ConfigError that names the folder and both remedies.
"""

from __future__ import annotations

import gzip
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from netprobe.errors import ConfigError


@dataclass(frozen=True)
class VisionSet:
    """What netprobe needs to know about one torchvision data set."""

    title: str
    cls_name: str  # the class in torchvision.datasets
    folder: str  # where torchvision looks under root
    files: tuple[str, ...]  # what must be in that folder
    mean: tuple[float, ...]  # published per-channel statistics of the train split, in [0, 1]
    std: tuple[float, ...]
    channels: int
    image_size: int
    num_classes: int
    hflip: bool  # whether a mirror image keeps its label (not for digits)
    what_to_put: str

    def path(self, root: str | Path) -> Path:
        return Path(root) / self.folder


IDX = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

SETS: dict[str, VisionSet] = {
    "mnist": VisionSet(
        "MNIST",
        "MNIST",
        "MNIST/raw",
        IDX,
        (0.1307,),
        (0.3081,),
        1,
        28,
        10,
        hflip=False,
        what_to_put="the MNIST raw IDX files (train-images-idx3-ubyte, ..., .gz is fine)",
    ),
    "fashion_mnist": VisionSet(
        "Fashion-MNIST",
        "FashionMNIST",
        "FashionMNIST/raw",
        IDX,
        (0.2860,),
        (0.3530,),
        1,
        28,
        10,
        hflip=True,
        what_to_put="the Fashion-MNIST raw IDX files (train-images-idx3-ubyte, ..., .gz is fine)",
    ),
    "cifar10": VisionSet(
        "CIFAR-10",
        "CIFAR10",
        "cifar-10-batches-py",
        (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"),
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        3,
        32,
        10,
        hflip=True,
        what_to_put="the contents of cifar-10-python.tar.gz (data_batch_1..5, test_batch, "
        "batches.meta)",
    ),
    "cifar100": VisionSet(
        "CIFAR-100",
        "CIFAR100",
        "cifar-100-python",
        ("train", "test", "meta"),
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
        3,
        32,
        100,
        hflip=True,
        what_to_put="the contents of cifar-100-python.tar.gz (train, test, meta)",
    ),
}


def missing_files(name: str, root: str | Path) -> list[str]:
    """The files data set `name` lacks under `root` (gzipped IDX files count as present)."""
    folder = SETS[name].path(root)
    return [
        f
        for f in SETS[name].files
        if not (folder / f).is_file() and not (folder / f"{f}.gz").is_file()
    ]


# The last data set read, by its files (name, size, mtime): `prepare` reads them before Hydra
# makes a run directory, and the job in the same process takes them from here, not reading twice.
_READ: dict[tuple, tuple[torch.Tensor, ...]] = {}


def prepare(cfg: Any) -> None:
    """Make sure the files of `cfg.name` are under `cfg.root`, downloading them if allowed, and
    that they read whole.

    Runs before any training (and before Hydra makes a run directory): a data set that is
    missing, corrupted, or whose download fails, is a ConfigError naming the folder and the
    remedies.
    """
    spec = SETS[cfg.name]
    for key in ("channels", "image_size", "num_classes"):
        # The model is sized from these keys, so they must say what the files hold.
        if cfg.get(key) != getattr(spec, key):
            raise ConfigError(
                f"data.{key}={cfg.get(key)} does not match {spec.title} "
                f"({spec.channels}x{spec.image_size}x{spec.image_size} images, "
                f"{spec.num_classes} classes); leave data.{key} at {getattr(spec, key)}"
            )
    folder = spec.path(cfg.root)
    missing = missing_files(cfg.name, cfg.root)
    if not missing:
        _gunzip_idx(folder, spec)
        _read(cfg)
        return
    if not cfg.get("download", False):
        found = (
            f"no {spec.title} files in {folder}"
            if len(missing) == len(spec.files)
            else f"{spec.title} files missing in {folder}: {', '.join(missing)}"
        )
        raise ConfigError(
            f"data.root={cfg.root!s}: {found}; run with data.download=true, "
            f"or put {spec.what_to_put} in {folder}"
        )
    try:
        for train in (True, False):
            _torchvision_set(spec, cfg.root, train=train, download=True)
    except Exception as exc:  # noqa: BLE001 - no network, a bad mirror, a full disk: one line
        # torchvision's messages span lines (one per mirror tried); keep them on one line.
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ConfigError(
            f"data.root={cfg.root!s}: downloading {spec.title} into {folder} failed ({reason}); "
            f"put {spec.what_to_put} in {folder}"
        ) from None
    _read(cfg)


def load(cfg: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train and test images as uint8 [N, C, H, W] and labels as int64 [N], from the files."""
    if _files_key(cfg) not in _READ:
        prepare(cfg)
    x_train, y_train, x_test, y_test = _READ[_files_key(cfg)]
    return x_train, y_train, x_test, y_test


def _read(cfg: Any) -> None:
    """Read both splits into `_READ`; ConfigError when they do not read, or do not agree: as many
    labels as images, each a class of the data set."""
    spec = SETS[cfg.name]
    bad = f"data.root={cfg.root!s}: {spec.title} files in {spec.path(cfg.root)} are"
    remedy = "delete them and run with data.download=true"
    parts = []
    for train in (True, False):
        try:
            ds = _torchvision_set(spec, cfg.root, train=train, download=False)
        except Exception:  # noqa: BLE001 - a failed CIFAR checksum, a truncated file, ...
            raise ConfigError(f"{bad} unreadable or corrupted; {remedy}") from None
        x, y = _as_tensors(ds.data, ds.targets)
        split = "train" if train else "test"
        if len(x) != len(y):
            raise ConfigError(
                f"{bad} inconsistent: {split} has {len(x)} images but {len(y)} labels; {remedy}"
            )
        if len(y) and not 0 <= int(y.min()) <= int(y.max()) < spec.num_classes:
            raise ConfigError(
                f"{bad} inconsistent: {split} labels run {int(y.min())}..{int(y.max())}, "
                f"not 0..{spec.num_classes - 1}; {remedy}"
            )
        parts.extend((x, y))
    _READ.clear()  # one data set held at a time
    _READ[_files_key(cfg)] = tuple(parts)


def _files_key(cfg: Any) -> tuple:
    """What the files of `cfg.name` under `cfg.root` are: each one's path, size and mtime."""
    folder = SETS[cfg.name].path(cfg.root)
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.glob("*"))]
    return (cfg.name, str(folder.resolve()), *stats)


def _torchvision_set(spec: VisionSet, root: str | Path, *, train: bool, download: bool) -> Any:
    import torchvision.datasets

    cls = getattr(torchvision.datasets, spec.cls_name)
    return cls(str(root), train=train, download=download)


def _as_tensors(data: Any, targets: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's storage (uint8 [N, H, W] tensor, or HWC numpy for CIFAR) as [N, C, H, W]."""
    if isinstance(data, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(data.transpose(0, 3, 1, 2)))
    else:
        x = data.unsqueeze(1).contiguous()
    return x, torch.as_tensor(targets, dtype=torch.int64)


def _gunzip_idx(folder: Path, spec: VisionSet) -> None:
    """Unpack IDX files given as .gz: torchvision reads only the unpacked ones."""
    for name in spec.files:
        packed, plain = folder / f"{name}.gz", folder / name
        if not plain.is_file() and packed.is_file():
            tmp = plain.with_name(plain.name + ".tmp")
            with gzip.open(packed, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            tmp.replace(plain)
