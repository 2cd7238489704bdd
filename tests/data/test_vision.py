"""MNIST, Fashion-MNIST, CIFAR-10/100 through torchvision's classes, from tiny files on disk."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from netprobe.config import compose
from netprobe.data import build_data, prepare_data
from netprobe.errors import ConfigError
from tests.data.conftest import write_cifar10, write_idx, write_mnist
from tests.helpers import netprobe_cmd

REPO = Path(__file__).resolve().parents[2]


def data_cfg(name: str, root: Path, *overrides: str):
    return compose([f"data={name}", f"data.root={root}", *overrides]).data


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
@pytest.mark.parametrize("gz", [False, True], ids=["idx", "idx.gz"])
def test_mnist_family_official_split(tmp_path: Path, fake, name: str, folder: str, gz: bool):
    arrays = fake.mnist(tmp_path, folder, gz=gz)
    data = build_data(data_cfg(name, tmp_path))
    assert data.x_train.dtype == torch.uint8 and data.x_train.shape == (64, 1, 28, 28)
    assert np.array_equal(data.x_train[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(data.y_train.numpy(), arrays["train-labels-idx1-ubyte"])
    assert np.array_equal(data.x_val[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    assert np.array_equal(data.y_val.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert data.y_train.dtype == torch.int64 and data.num_classes == 10 and data.scale == 255
    expected = (0.1307, 0.3081) if name == "mnist" else (0.2860, 0.3530)
    assert (data.mean.item(), data.std.item()) == pytest.approx(expected)
    assert data.hflip is (name == "fashion_mnist")  # mirrored digits are not digits


def test_cifar10_layout_and_statistics(tmp_path: Path, fake, cifar_checksums_off):
    arrays = fake.cifar10(tmp_path)
    data = build_data(data_cfg("cifar10", tmp_path))
    assert data.x_train.shape == (40, 3, 32, 32) and data.x_val.shape == (10, 3, 32, 32)
    # Each stored row is a 3x32x32 image, channels first: the loader must undo torchvision's HWC.
    assert np.array_equal(data.x_train.numpy(), arrays["x_train"].reshape(-1, 3, 32, 32))
    assert np.array_equal(data.y_train.numpy(), arrays["y_train"])
    assert np.array_equal(data.x_val.numpy(), arrays["x_test"].reshape(-1, 3, 32, 32))
    assert data.x_train.is_contiguous()
    assert data.mean.tolist() == pytest.approx([0.4914, 0.4822, 0.4465])
    assert data.std.tolist() == pytest.approx([0.2470, 0.2435, 0.2616])
    assert data.hflip and data.crop_padding == 4


def test_cifar100_fine_labels(tmp_path: Path, fake, cifar_checksums_off):
    arrays = fake.cifar100(tmp_path)
    cfg = data_cfg("cifar100", tmp_path)
    assert cfg.num_classes == 100
    data = build_data(cfg)
    assert data.num_classes == 100
    assert np.array_equal(data.y_train.numpy(), arrays["y_train"])
    assert np.array_equal(data.x_val.numpy(), arrays["x_test"].reshape(-1, 3, 32, 32))
    assert data.mean.tolist() == pytest.approx([0.5071, 0.4865, 0.4409])


def test_val_fraction_splits_train_with_data_seed(tmp_path: Path, fake):
    arrays = fake.mnist(tmp_path)
    a = build_data(data_cfg("mnist", tmp_path, "data.val_fraction=0.25"))
    b = build_data(data_cfg("mnist", tmp_path, "data.val_fraction=0.25", "seed=7"))
    c = build_data(data_cfg("mnist", tmp_path, "data.val_fraction=0.25", "data.seed=1"))
    assert len(a.x_val) == 16 and len(a.x_train) == 48
    assert torch.equal(a.x_val, b.x_val)  # the run's seed leaves the split alone
    assert not torch.equal(a.x_val, c.x_val)
    # Both parts come from the train files, none from the test files, and none is lost.
    together = torch.cat([a.x_train, a.x_val])[:, 0].flatten(1)
    original = torch.from_numpy(arrays["train-images-idx3-ubyte"]).flatten(1)
    assert sorted(map(tuple, together.tolist())) == sorted(map(tuple, original.tolist()))


def test_defaults_of_the_four_configs():
    for name, augment in [("mnist", False), ("fashion_mnist", False), ("cifar10", True)]:
        cfg = compose([f"data={name}"]).data
        assert cfg.val_fraction is None and cfg.download is False and cfg.augment is augment
    assert compose(["data=cifar100"]).data.augment is True


def test_root_follows_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    assert compose(["data=mnist"]).data.root == "data"
    monkeypatch.setenv("NETPROBE_DATA", str(tmp_path))
    assert compose(["data=cifar10"]).data.root == str(tmp_path)


@pytest.mark.parametrize(
    "name, folder, hint",
    [
        ("mnist", "MNIST/raw", "MNIST raw IDX files"),
        ("fashion_mnist", "FashionMNIST/raw", "Fashion-MNIST raw IDX files"),
        ("cifar10", "cifar-10-batches-py", "cifar-10-python.tar.gz"),
        ("cifar100", "cifar-100-python", "cifar-100-python.tar.gz"),
    ],
)
def test_missing_files_name_folder_and_both_remedies(tmp_path: Path, name, folder, hint):
    with pytest.raises(ConfigError) as err:
        build_data(data_cfg(name, tmp_path))
    message = str(err.value)
    assert "\n" not in message
    assert str(tmp_path / folder) in message
    assert "data.download=true" in message and hint in message


def test_partly_missing_files_are_listed(tmp_path: Path, fake):
    fake.mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(ConfigError, match=r"missing in .*: t10k-labels-idx1-ubyte;"):
        prepare_data(data_cfg("mnist", tmp_path))


def test_failed_download_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise RuntimeError(
            "Error downloading train-images-idx3-ubyte.gz:\nTried a mirror, got:\n404"
        )

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    with pytest.raises(ConfigError) as err:
        prepare_data(data_cfg("mnist", tmp_path, "data.download=true"))
    message = str(err.value)
    assert "\n" not in message and "downloading MNIST" in message and "404" in message
    assert str(tmp_path / "MNIST" / "raw") in message


def test_corrupted_cifar_fails_torchvisions_checksum(tmp_path: Path, fake):
    fake.cifar10(tmp_path)  # right names, wrong contents for the real MD5 sums
    with pytest.raises(ConfigError, match="corrupted.*data.download=true"):
        build_data(data_cfg("cifar10", tmp_path))


def test_truncated_idx_file_is_reported(tmp_path: Path, fake):
    fake.mnist(tmp_path)
    images = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:6])
    with pytest.raises(ConfigError, match="unreadable or corrupted"):
        build_data(data_cfg("mnist", tmp_path))


@pytest.mark.parametrize(
    "override, valid",
    [("data.image_size=32", "28"), ("data.channels=3", "1"), ("data.num_classes=5", "10")],
)
def test_shape_keys_must_match_the_data_set(tmp_path: Path, fake, override: str, valid: str):
    fake.mnist(tmp_path)
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}=\d+ does not match MNIST .* at {valid}$"):
        prepare_data(data_cfg("mnist", tmp_path, override))


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("NETPROBE_DATA", None)
    return netprobe_cmd(*args, cwd=cwd, timeout=120, env=env)


def test_cli_trains_on_mnist_files(tmp_path: Path, fake):
    fake.mnist(tmp_path / "files", gz=True)
    run_dir = tmp_path / "run"
    out = _cli(
        [
            "train",
            "data=mnist",
            f"data.root={tmp_path / 'files'}",
            "data.probe_size=16",
            "data.batch_size=16",
            "trainer.max_steps=2",
            f"hydra.run.dir={run_dir}",
        ],
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "completed" and info["data"] == "mnist" and info["steps_done"] == 2


def test_cli_missing_data_exits_2_before_any_run_directory(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    out = _cli(["train", "data=cifar10", f"data.root={tmp_path / 'empty'}"], tmp_path)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "Traceback" not in out.stderr
    assert "cifar-10-batches-py" in out.stderr and "data.download=true" in out.stderr
    assert not (tmp_path / "outputs").exists()
    assert not list(tmp_path.rglob("run.json"))


def _mislabelled(root: Path) -> None:
    """MNIST files that read, but hold 10 train labels for 64 images."""
    write_mnist(root)
    write_idx(root / "MNIST" / "raw" / "train-labels-idx1-ubyte", np.zeros(10, dtype=np.uint8))


def _label_out_of_range(root: Path) -> None:
    write_mnist(root)
    write_idx(root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte", np.full(16, 12, dtype=np.uint8))


@pytest.mark.parametrize(
    "name, damage, words",
    [
        ("cifar10", write_cifar10, ["cifar-10-batches-py are unreadable or corrupted"]),
        ("mnist", _mislabelled, ["inconsistent: train has 64 images but 10 labels"]),
        ("mnist", _label_out_of_range, ["inconsistent: test labels run 12..12, not 0..9"]),
    ],
    ids=["checksum", "label count", "label range"],
)  # fmt: skip
def test_cli_damaged_data_exits_2_before_any_run_directory(tmp_path: Path, name, damage, words):
    """Files that are all there but do not read whole are refused where missing ones are: before
    Hydra makes the run's folder, in one line (they used to leave an empty folder behind, or a
    traceback from deep in the batches)."""
    damage(tmp_path / "files")
    run_dir = tmp_path / "run"
    args = ["train", f"data={name}", f"data.root={tmp_path / 'files'}", f"hydra.run.dir={run_dir}"]
    out = _cli(args, tmp_path)
    assert out.returncode == 2, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr, out.stderr
    assert all(w in out.stderr for w in [*words, "data.download=true"]), out.stderr
    assert not run_dir.exists()
