"""Checkpoints in a run's `checkpoints/` folder (SPEC §3): the model after an epoch, and more.

`start.pt` holds the weights before the first step, `epoch-NNNN.pt` the state after epoch NNNN
(counted from 0, as the stored tables count), and `last.pt` the state after the latest whole
epoch, for resuming (netprobe.resume).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

FOLDER = "checkpoints"


def rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def checkpoint_path(run_dir: str | os.PathLike, epoch: int | str) -> Path:
    name = f"epoch-{epoch:04d}.pt" if isinstance(epoch, int) else f"{epoch}.pt"
    return Path(run_dir) / FOLDER / name


def save_checkpoint(
    path: Path,
    model: nn.Module,
    *,
    epoch: int,
    step: int,
    optimizer: torch.optim.Optimizer | None = None,
    **extra: Any,
) -> Path:
    """Write {model, optimizer, epoch, step, rng, **extra} to `path` atomically."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "epoch": epoch,
        "step": step,
        "rng": rng_states(),
        **extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """A checkpoint as saved; `weights_only=False` because it holds numpy RNG state."""
    return torch.load(path, map_location=map_location, weights_only=False)
