"""Shared fixtures: tiny configs composed through the same path users take, and tiny runs."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import netprobe
from netprobe.config import compose
from netprobe.store import Run
from netprobe.train import train

# Small enough for a 2-core CI machine: a few dozen steps on 8×8 synthetic images.
TINY = [
    "data=synthetic",
    "data.num_samples=256",
    "data.image_size=8",
    "data.batch_size=32",
    "data.probe_size=32",
    "trainer.epochs=2",
    "trainer.flush_every=5",
]

_counter = itertools.count()


@pytest.fixture(scope="session")
def train_tiny() -> Callable[..., Path]:
    """`train_tiny(path, "model=cnn", "seed=1")` trains a tiny run (TINY, then the overrides)
    into `path` and returns it: module-scoped fixtures use it to train their runs once per module
    (test files cannot import TINY under --import-mode=importlib)."""

    def make(path: Path, *overrides: str) -> Path:
        train(compose([*TINY, *overrides]), path)
        return path

    return make


@pytest.fixture(scope="session")
def train_seeds(train_tiny: Callable[..., Path]) -> Callable[..., Path]:
    """`train_seeds(root, "model=cnn")` trains `train_tiny` runs root/seed0 and root/seed1 (or
    the given `seeds`) that differ only by seed, and returns root: one figure group."""

    def make(root: Path, *overrides: str, seeds: tuple[int, ...] = (0, 1)) -> Path:
        for seed in seeds:
            train_tiny(root / f"seed{seed}", *overrides, f"seed={seed}")
        return root

    return make


@pytest.fixture
def tiny_run(tmp_path: Path, train_tiny: Callable[..., Path]) -> Callable[..., Run]:
    """`tiny_run("model=cnn", "probes=[gradients]")` trains a tiny run and returns it loaded."""

    def make(*overrides: str) -> Run:
        return netprobe.load(train_tiny(tmp_path / f"run{next(_counter)}", *overrides))

    return make


def _held_bytes(probe: object, model: nn.Module) -> list[int]:
    owned = {p.untyped_storage().data_ptr() for p in model.parameters()}
    owned |= {p.grad.untyped_storage().data_ptr() for p in model.parameters() if p.grad is not None}
    seen: dict[int, int] = {}

    def visit(value: object) -> None:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            if storage.data_ptr() not in owned:
                seen[storage.data_ptr()] = storage.nbytes()
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)

    visit(vars(probe))
    return sorted(seen.values())


@pytest.fixture(scope="session")
def held_bytes() -> Callable[[object, nn.Module], list[int]]:
    """`held_bytes(probe, model)`: sorted bytes of every distinct storage the probe's attributes
    reference (through lists, tuples and dicts), besides the model's parameters and gradients."""
    return _held_bytes


@pytest.fixture(autouse=True)
def _close_figures():
    """Figure tests call draw functions directly; their figures must not pile up across tests."""
    yield
    import matplotlib.pyplot as plt

    plt.close("all")
