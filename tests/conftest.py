"""Shared fixtures: tiny configs composed through the same path users take, and tiny runs."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest

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


@pytest.fixture
def tiny_run(tmp_path: Path) -> Callable[..., Run]:
    """`tiny_run("model=cnn", "probes=[gradients]")` trains a tiny run and returns it loaded."""

    def make(*overrides: str) -> Run:
        cfg = compose([*TINY, *overrides])
        run_dir = tmp_path / f"run{next(_counter)}"
        train(cfg, run_dir)
        return netprobe.load(run_dir)

    return make
