"""What many test modules do alike: run the `netprobe` command, and step a model through the
library API (`attach`) as a user's own loop does."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import netprobe


def netprobe_cmd(
    *args: str, cwd: Path | None = None, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`netprobe ARGS` in a fresh interpreter, as a user runs it; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "netprobe", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def train_steps(
    mon: netprobe.Monitor,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    after: Callable[[], None] | None = None,
) -> None:
    """One optimizer step per batch with the monitor's two calls around `opt.step()`; `after`
    runs at the end of each step (a scheduler, a fake clock)."""
    for x, y in batches:
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        mon.after_backward(loss)
        opt.step()
        mon.after_step()
        if after is not None:
            after()
