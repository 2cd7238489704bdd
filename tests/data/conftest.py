"""Tiny data sets written in torchvision's own on-disk formats, for the real loading code."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> None:
    """The IDX (ubyte) format of the MNIST files: magic 0x0000 08 <ndim>, big-endian sizes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def write_mnist(
    root: Path, folder: str = "MNIST", n_train: int = 64, n_test: int = 16, gz: bool = False
) -> dict[str, np.ndarray]:
    """Random 28x28 images and labels as root/<folder>/raw/{train,t10k}-{images,labels}-idx*."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        write_idx(root / folder / "raw" / name, array, gz=gz)
    return arrays


def _pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(root: Path, per_batch: int = 8, n_test: int = 10) -> dict[str, np.ndarray]:
    """cifar-10-batches-py/: data_batch_1..5 and test_batch ({data: [n, 3072] CHW rows,
    labels}) and batches.meta ({label_names})."""
    rng = np.random.default_rng(1)
    folder = root / "cifar-10-batches-py"
    xs, ys = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, per_batch).tolist()
        _pickle(folder / f"data_batch_{i}", {"batch_label": f"batch {i}", "data": x, "labels": y})
        xs.append(x)
        ys.extend(y)
    xt = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    yt = rng.integers(0, 10, n_test).tolist()
    _pickle(folder / "test_batch", {"batch_label": "test", "data": xt, "labels": yt})
    _pickle(folder / "batches.meta", {"label_names": [f"class{k}" for k in range(10)]})
    return {"x_train": np.vstack(xs), "y_train": np.array(ys), "x_test": xt, "y_test": np.array(yt)}


def write_cifar100(root: Path, n_train: int = 40, n_test: int = 10) -> dict[str, np.ndarray]:
    """cifar-100-python/: train and test ({data, fine_labels, coarse_labels}) and meta."""
    rng = np.random.default_rng(2)
    folder = root / "cifar-100-python"
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, n).tolist()
        _pickle(
            folder / split,
            {"data": x, "fine_labels": fine, "coarse_labels": [f // 5 for f in fine]},
        )
        out[f"x_{split}"], out[f"y_{split}"] = x, np.array(fine)
    _pickle(
        folder / "meta",
        {
            "fine_label_names": [f"fine{k}" for k in range(100)],
            "coarse_label_names": [f"coarse{k}" for k in range(20)],
        },
    )
    return out


@pytest.fixture
def cifar_checksums_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision checks CIFAR files against the real archives' MD5 sums, which tiny test files
    cannot match; keep its existence check and drop only the checksum."""
    import torchvision.datasets.cifar as cifar

    original = cifar.check_integrity
    monkeypatch.setattr(cifar, "check_integrity", lambda fpath, md5=None: original(fpath, None))


@pytest.fixture
def fake() -> SimpleNamespace:
    """The writers above, for tests (conftest modules are not importable by name)."""
    return SimpleNamespace(
        idx=write_idx, mnist=write_mnist, cifar10=write_cifar10, cifar100=write_cifar100
    )
