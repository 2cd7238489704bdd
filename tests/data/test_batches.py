"""Batches: the device-resident path against the DataLoader path, and batch augmentation."""

from __future__ import annotations

import itertools

import pytest
import torch

from netprobe.data import Batches, ImageData, keep_on_device, random_crop_flip

CPU = torch.device("cpu")


def image_data(n: int = 203, size: int = 8, channels: int = 3) -> ImageData:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (n,), generator=g)
    return ImageData("toy", x, y, x[:20], y[:20], 10, scale=255.0, hflip=True)


def epochs(batches: Batches, n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [batch for _ in range(n) for batch in batches]


@pytest.mark.parametrize("augment", [False, True], ids=["plain", "augmented"])
@pytest.mark.parametrize("drop_last", [False, True])
def test_on_device_path_gives_the_dataloader_batches(augment: bool, drop_last: bool):
    data = image_data()
    kwargs = dict(shuffle=True, seed=3, drop_last=drop_last, augment=augment)
    loader = epochs(Batches(data, "train", 32, CPU, on_device=False, **kwargs))
    resident = epochs(Batches(data, "train", 32, CPU, on_device=True, **kwargs))
    expected_batches = 2 * (203 // 32 if drop_last else 203 // 32 + 1)
    assert len(loader) == len(resident) == expected_batches
    for (xa, ya), (xb, yb) in zip(loader, resident):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # Shuffled, differently in each epoch, and every sample seen once per epoch.
    half = len(loader) // 2
    first = torch.cat([y for _, y in loader[:half]])
    second = torch.cat([y for _, y in loader[half:]])
    assert not torch.equal(first, second)
    if not drop_last:
        assert torch.equal(first.sort().values, data.y_train.sort().values)


def test_validation_batches_keep_order():
    data = image_data()
    for on_device in (False, True):
        batches = Batches(data, "val", 8, CPU, shuffle=False, on_device=on_device)
        assert torch.equal(torch.cat([y for _, y in batches]), data.y_val)
        assert torch.equal(torch.cat([x for x, _ in batches]), data.normalize(data.x_val))


def test_dataloader_path_leaves_the_global_rng_alone():
    """Dropout and friends draw from the global RNG; the data path must not shift it."""
    data = image_data()
    torch.manual_seed(11)
    untouched = torch.rand(4)
    for on_device in (False, True):
        torch.manual_seed(11)
        epochs(Batches(data, "train", 32, CPU, shuffle=True, on_device=on_device, augment=True))
        assert torch.equal(torch.rand(4), untouched)


def test_worker_processes_give_the_same_batches():
    data = image_data()
    inline = epochs(Batches(data, "train", 32, CPU, shuffle=True, seed=4))
    workers = epochs(Batches(data, "train", 32, CPU, shuffle=True, seed=4, num_workers=2))
    assert all(torch.equal(xa, xb) for (xa, _), (xb, _) in zip(inline, workers))


def crops(image: torch.Tensor, padding: int, flip: bool) -> list[torch.Tensor]:
    """Every crop (and mirror) the augmentation may return for one image, by a plain loop."""
    c, h, w = image.shape
    padded = torch.zeros(c, h + 2 * padding, w + 2 * padding, dtype=image.dtype)
    padded[:, padding : padding + h, padding : padding + w] = image
    out = []
    for dy, dx in itertools.product(range(2 * padding + 1), repeat=2):
        crop = padded[:, dy : dy + h, dx : dx + w]
        out.append(crop)
        if flip:
            out.append(crop.flip(-1))
    return out


@pytest.mark.parametrize("flip", [False, True])
def test_random_crop_flip_returns_a_crop_of_each_sample(flip: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (24, 2, 6, 6), generator=g, dtype=torch.uint8)
    out = random_crop_flip(x, 2, flip, torch.Generator().manual_seed(5))
    assert out.shape == x.shape and out.dtype == x.dtype
    for sample, image in zip(out, x):
        assert any(torch.equal(sample, crop) for crop in crops(image, 2, flip))


def test_random_crop_flip_covers_every_offset_and_mirrors_half():
    # One bright pixel at (3, 1) of an 8x8 image marks where each crop moved it.
    n, size, pad = 4000, 8, 2
    x = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    x[:, 0, 3, 1] = 255
    out = random_crop_flip(x, pad, True, torch.Generator().manual_seed(1))
    hits = (out[:, 0] == 255).flatten(1)
    assert hits.sum(1).le(1).all()  # cropped away, or kept exactly once
    where = hits[hits.any(1)].float().argmax(1)
    rows, cols = where // size, where % size
    # Row 3 moves by -2..+2; column 1 to -1..3 unmirrored (0..3 visible), mirrored to 4..8.
    assert set(rows.long().tolist()) == {1, 2, 3, 4, 5}
    assert set(cols.long().tolist()) == set(range(8))
    assert 0.45 < (cols >= 4).float().mean().item() < 0.55


def test_augmentation_is_seeded_and_leaves_shuffling_alone():
    data = image_data()
    plain = epochs(Batches(data, "train", 32, CPU, shuffle=True, seed=2))
    aug1 = epochs(Batches(data, "train", 32, CPU, shuffle=True, seed=2, augment=True))
    aug2 = epochs(Batches(data, "train", 32, CPU, shuffle=True, seed=2, augment=True))
    for (_, yp), (xa, ya), (xb, _) in zip(plain, aug1, aug2):
        assert torch.equal(yp, ya) and torch.equal(xa, xb)
    assert any(not torch.equal(xp, xa) for (xp, _), (xa, _) in zip(plain, aug1))


def test_keep_on_device_decision(monkeypatch: pytest.MonkeyPatch):
    data = image_data()  # 203 * 3 * 8 * 8 bytes of images plus labels
    assert keep_on_device(True, data, CPU) is True
    assert keep_on_device(False, data, torch.device("cuda")) is False
    assert keep_on_device(None, data, CPU) is False
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * data.nbytes + 4, 0))
    assert keep_on_device(None, data, gpu) is True
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * data.nbytes, 0))
    assert keep_on_device(None, data, gpu) is False


def test_training_is_the_same_on_either_path(tiny_run):
    """The whole run, not just the batches: same losses with the data on the device or not."""
    runs = [tiny_run("data.augment=true", f"data.on_device={flag}") for flag in (True, False)]
    a, b = (r.scalars("train", "loss")["value"].to_numpy() for r in runs)
    assert len(a) > 10 and (a == b).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_paths_agree_on_the_gpu():
    data = image_data()
    gpu = torch.device("cuda")
    kwargs = dict(shuffle=True, seed=3, augment=True)
    loader = epochs(Batches(data, "train", 32, gpu, on_device=False, **kwargs))
    resident = epochs(Batches(data, "train", 32, gpu, on_device=True, **kwargs))
    assert all(x.device.type == "cuda" for x, _ in resident)
    for (xa, ya), (xb, yb) in zip(loader, resident):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert keep_on_device(None, data, gpu) is True  # a few kB fit on any GPU
