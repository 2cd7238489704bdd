"""Resuming an interrupted run in its own directory: `trainer.resume=true hydra.run.dir=RUN`.

Everything about resuming is decided here: whether a command asks for it, which checkpoint a run
continues from (`checkpoints/last.pt`, written at every epoch end when `trainer.checkpoint_every`
> 0), and cutting the stored tables back to that checkpoint, so that the finished run holds
every step exactly once. Code that refuses to write into a directory already holding a run asks
`resuming(cfg)` first.

`trainer.resume=true` means "continue the run in this directory if there is one": a directory
holding no run yet starts from the beginning, so a sweep given it from the outset can be sent
again (or requeued by SLURM) and every job picks up where it stopped.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from netprobe.checkpoint import checkpoint_path, load_checkpoint, set_rng_states
from netprobe.errors import ConfigError
from netprobe.lifecycle import RunLock
from netprobe.store import RUN_FILE, drop_rows_after

_RESUME = re.compile(r"^\+*trainer\.resume=(true|True|1)$")


def resuming(cfg: DictConfig) -> bool:
    return bool(cfg.trainer.get("resume", False))


def check_command_line(args: Sequence[str]) -> None:
    """Before Hydra makes a directory: resuming needs the run's own directory on the command line
    (`hydra.run.dir=RUN`, or `hydra.sweep.dir=SWEEP` to resume every job of a sweep); without
    it Hydra would make a new, timestamped one."""
    if not any(_RESUME.match(a) for a in args):
        return
    sweep = bool({"-m", "--multirun"} & set(args))
    key = "hydra.sweep.dir" if sweep else "hydra.run.dir"
    if not any(a.startswith(f"{key}=") for a in args):
        what = "sweep" if sweep else "run"
        raise ConfigError(f"trainer.resume=true needs {key}=<the {what} directory to continue>")


def start(cfg: DictConfig, run_dir: str | Path, writes: bool = True) -> dict[str, Any] | None:
    """The checkpoint `run_dir` continues from, or None when not resuming. With `writes` (the
    process that writes the run) the stored rows of later epochs are removed."""
    if not resuming(cfg):
        return None
    run_dir = Path(run_dir)
    if not (run_dir / RUN_FILE).exists():
        if writes:
            print(f"netprobe: no run in {run_dir} to resume; starting it", file=sys.stderr)
        return None
    path = checkpoint_path(run_dir, "last")
    if not path.exists():
        raise ConfigError(
            f"trainer.resume=true, but {path} does not exist: the run saved no checkpoint "
            "(trainer.checkpoint_every=0, or it stopped in its first epoch)"
        )
    state = load_checkpoint(path)
    if "monitor" not in state or "data" not in state:
        raise ConfigError(f"{path} lacks the probe and data state needed to resume")
    if writes:
        # Under the run's lock: a run still going in another process is refused, not cut back.
        with RunLock(run_dir):
            drop_rows_after(run_dir, state["epoch"])
    return state


def restore(
    state: dict[str, Any],
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    batches: Any,
) -> int:
    """Put the training state back as it was at the checkpoint; returns the epoch to run next.
    The RNG goes last: building the model and the probes must not move it."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    batches.load_state_dict(state["data"])
    set_rng_states(state["rng"])
    return state["epoch"] + 1
