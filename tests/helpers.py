"""What many test modules do alike: run the `netprobe` command, step a model through the
library API (`attach`) as a user's own loop does, run the fused kernels on other builds or
thread counts, make Parquet writes fail as on a full disk, and show a run as if it had stopped
earlier, or as a kill -9 leaves it."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import platform
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import netprobe
from netprobe import native
from netprobe.native import Block
from netprobe.store import Run

# Builds of a fused kernel unlike the tuned one, and the torch threads each runs on: SSE2 only,
# AVX2 without AVX-512, and one that splits even a small job between 3 threads.
OTHER_BUILDS = {
    "baseline": ([], 1),
    "avx2": (["-march=x86-64-v3"], 1),
    "threads": (["-DTHREAD_MIN=1"], 3),
}


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


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's CPU threads set to n meanwhile (the fused kernels take as many), then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def other_build(source: str, build: str, folder: Path) -> tuple[ctypes.CDLL, int]:
    """netprobe/native/SOURCE compiled into `folder` as OTHER_BUILDS[build] says, loaded, and the
    threads to run it on (skips the AVX2 build off x86)."""
    flags, threads = OTHER_BUILDS[build]
    if build == "avx2" and platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("an x86 instruction set")
    target = folder / source.replace(".c", ".so")
    assert native._build(
        native.compiler(), native.HERE / source, target, ([*native.FLAGS, *flags],)
    )
    return ctypes.CDLL(str(target)), threads


def fused_grad_stats(kernels, grads: list[torch.Tensor]) -> tuple[np.ndarray, float]:
    """The fused `gradients` statistics: per tensor [n, 5] in a fresh host array, and ‖g‖₂."""
    out = Block.of(np.empty((kernels.n, 5)))
    return out.array, kernels.grad_stats(grads, out)


def fail_writes(monkeypatch: pytest.MonkeyPatch, where: str, after: int = 0) -> list[str]:
    """Parquet writes into a path holding `where` fail with ENOSPC after `after` of them."""
    real, calls = pq.write_table, []

    def write_table(table, path, *args, **kwargs):
        if where in str(path):
            calls.append(str(path))
            if len(calls) > after:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(table, path, *args, **kwargs)

    monkeypatch.setattr(pq, "write_table", write_table)
    return calls


class Stopped:
    """`run` as if it had stopped after step `last`: its scalars up to there (a seed that met
    `trainer.target_val_acc` earlier than the others, or lost its last part file)."""

    def __init__(self, run: Run, last: int) -> None:
        self._run, self._last = run, last

    def __getattr__(self, name: str):
        return getattr(self._run, name)

    def scalars(self, *args, **kwargs) -> pd.DataFrame:
        df = self._run.scalars(*args, **kwargs)
        return df[df["step"] <= self._last]


def crash(run_dir: Path) -> Run:
    """The run in `run_dir` as a `kill -9` leaves it: run.json still `running`, with no `final`,
    under a process that is gone (pid 2**22 + 1, above Linux's largest), its tables kept."""
    import json
    import socket

    path = run_dir / "run.json"
    info = json.loads(path.read_text())
    info.update(status="running", final={}, ended_at=None, pid=2**22 + 1, host=socket.gethostname())
    path.write_text(json.dumps(info))
    return netprobe.load(run_dir)


def python_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused kernels' tensors checked in Python, as where tensors.cpp is not built."""
    from netprobe import native
    from netprobe.native import step as native_step

    monkeypatch.setattr(native, "tensor_checks", lambda: None)
    monkeypatch.setattr(native_step, "_accuracy_kernels", {})
