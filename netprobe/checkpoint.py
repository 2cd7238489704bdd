"""Checkpoints in a run's `checkpoints/` folder (SPEC §3): `start.pt` (before the first step),
`epoch-NNNN.pt` (after epoch NNNN, counted from 0) and `last.pt` (the latest whole epoch)."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from netprobe.errors import ConfigError, StorageError, first_line
from netprobe.store import atomic_write

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
    """Write {model, optimizer, epoch, step, rng, **extra} to `path` atomically and durably
    (netprobe.store.atomic_write); a failure leaves no temporary file and raises StorageError."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "epoch": epoch,
        "step": step,
        "rng": rng_states(),
        **extra,
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(path.parent, exc) from None

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(state, f)

    atomic_write(path, write)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """A checkpoint as saved; `weights_only=False` because it holds numpy RNG state. A file that
    cannot be read (truncated, empty, not a checkpoint) is a ConfigError naming it."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a damaged file
        # Its first sentence, whole: torch adds a paragraph of advice after it.
        reason = re.split(r"(?<=\.)\s", first_line(exc), maxsplit=1)[0].rstrip(".")
        raise ConfigError(f"{path} is damaged and cannot be read ({reason})") from None
    if not isinstance(state, dict) or not {"model", "epoch", "step"} <= state.keys():
        raise ConfigError(f"{path} is not a netprobe checkpoint")
    return state
