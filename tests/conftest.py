"""Shared fixtures: tiny configs composed through the same path users take, and tiny runs."""

from __future__ import annotations

import contextlib
import itertools
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import netprobe
from netprobe.config import compose
from netprobe.store import Run
from netprobe.train import train
from tests.helpers import python_checks

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
    visited: set[int] = set()

    def visit(value: object) -> None:
        if id(value) in visited:
            return
        visited.add(id(value))
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            if storage.data_ptr() not in owned:
                seen[storage.data_ptr()] = storage.nbytes()
        elif isinstance(value, np.ndarray):  # host blocks' pools, on the CPU
            whole = value if value.base is None else value.base
            seen[whole.ctypes.data] = whole.nbytes
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif type(value).__name__ in ("TorchBuffers", "FusedCodes", "HostBlocks"):
            visit(vars(value))  # a probe's state object, a pool of host blocks
        elif callable(value) and getattr(value, "__closure__", None):  # a probe's reduction
            for cell in value.__closure__:
                visit(cell.cell_contents)

    visit(vars(probe))
    return sorted(seen.values())


@pytest.fixture(params=["fused", "fused-py", "torch"])
def kernel_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test on both paths of the probes that have fused CPU kernels: those kernels
    (skipped where no C compiler builds them), their tensors checked by tensors.cpp where it is
    built ("fused") or in Python ("fused-py", as where it is not), and PyTorch's
    (NETPROBE_NATIVE=0), as on a GPU."""
    from netprobe import native

    if request.param == "torch":
        monkeypatch.setattr(native, "ENABLED", False)
    elif native.compiler() is None or not native.ENABLED:
        pytest.skip("no C compiler, or NETPROBE_NATIVE=0: the fused kernels are not built")
    if request.param == "fused-py":
        python_checks(monkeypatch)
    return request.param


@pytest.fixture(scope="session")
def held_bytes() -> Callable[[object, nn.Module], list[int]]:
    """`held_bytes(probe, model)`: sorted bytes of every distinct storage the probe's attributes
    reference (through lists, tuples and dicts), besides the model's parameters and gradients."""
    return _held_bytes


READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")
aten = torch.ops.aten
# Ops whose output size, or Python value, comes from the data: on a GPU each waits for the device.
# torch flags them only on CUDA (torch.cuda.set_sync_debug_mode); a dispatch mode sees them on CPU.
SYNCING = {
    aten._local_scalar_dense.default,  # .item(), float(t), int(t), bool(t), `if t:`
    aten.is_nonzero.default,
    aten.equal.default,
    aten.nonzero.default,  # torch.where(mask), mask.nonzero(), argwhere
    aten.masked_select.default,
    aten.bincount.default,  # sized by the largest value
    aten.repeat_interleave.Tensor,
    aten._unique.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
}
# Indexing syncs when an index is a boolean mask (`x[x != 0]`): it becomes nonzero's positions.
INDEXING = {
    aten.index.Tensor,
    aten.index_put.default,
    aten.index_put_.default,
    aten._index_put_impl_.default,
}


def _called_from(name: str, depth: int = 5) -> bool:
    frame = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return False
        if frame.f_code.co_name == name:
            return True
        frame = frame.f_back
    return False


class HostReads(TorchDispatchMode):
    """While entered, calls `flag(what)` on each host read of a tensor: a read method of
    torch.Tensor (patched through `monkeypatch`) or an aten op in SYNCING, or a boolean-mask index.
    The histogram counter's bincount on a CPU tensor passes: other devices count with index_add_."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, flag: Callable[[str], None]) -> None:
        super().__init__()
        self.flag = flag
        for name in READS:
            monkeypatch.setattr(torch.Tensor, name, self._read(name, getattr(torch.Tensor, name)))

    def _read(self, name: str, original: Callable) -> Callable:
        def method(tensor, *args, **kwargs):
            self.flag(f"Tensor.{name}()")
            return original(tensor, *args, **kwargs)

        return method

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNCING or (
            func in INDEXING
            and any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                for i in args[1]
            )
        ):
            cpu_count = func is aten.bincount.default and args[0].device.type == "cpu"
            if not (cpu_count and _called_from("bin_counts")):
                self.flag(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="session")
def host_reads() -> type[HostReads]:
    """The HostReads class, for tests that decide themselves when a read is an error."""
    return HostReads


@pytest.fixture
def no_host_sync(
    monkeypatch: pytest.MonkeyPatch,
) -> Callable[[], contextlib.AbstractContextManager]:
    """`with no_host_sync(): ...` fails on the first host read of a tensor inside the block."""

    def fail(what: str) -> None:
        where = "".join(traceback.format_stack(limit=6)[:-2])
        raise AssertionError(f"{what} reads a tensor's value on the host:\n{where}")

    @contextlib.contextmanager
    def block() -> Iterator[None]:
        with monkeypatch.context() as patch, HostReads(patch, fail):
            yield

    return block


@pytest.fixture(autouse=True)
def _close_figures():
    """Figure tests call draw functions directly; their figures must not pile up across tests."""
    yield
    import matplotlib.pyplot as plt

    plt.close("all")
