"""Fused CPU loops for the probes' hottest reductions: C sources next to this file, compiled once
per machine (for its CPU) with the system's C compiler and loaded with ctypes, or, for the
per-step kernels where Python's headers are found, imported as an extension module. Without a
compiler, or with NETPROBE_NATIVE=0, `library` returns None and the probes keep their PyTorch
path. Also the host blocks those loops write a step's record into."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import numpy as np
import torch

HERE = Path(__file__).parent
# No -ffast-math: NaN and ±inf must propagate as in PyTorch. No FMA contraction and no
# reassociation: every sum has a fixed order, so a result is the same on any x86 or ARM CPU,
# whatever its vector width, and whatever the number of threads. The CPU's own vector
# instructions where the compiler knows them (4× the speed of baseline x86-64 here).
FLAGS = ["-O3", "-std=c11", "-ffp-contract=off", "-fPIC", "-shared", "-pthread", "-Wno-psabi"]
TUNED = ["-march=native"]


def _cpu() -> str:
    """What identifies this CPU's instruction set: a cache shared by machines keeps one build
    per kind."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


# NETPROBE_NATIVE=0 switches the fused loops off (and the CPU's host-side curve with them: every
# per-step statistic then takes the path a GPU run takes). Read once, at import: a per-step
# os.environ lookup costs ~12 µs right after a small model's backward. Tests set ENABLED itself.
ENABLED = os.environ.get("NETPROBE_NATIVE", "1") != "0"


# The element types the C kernels are built for, and their functions' name suffixes.
SUFFIXES = {torch.float32: "f32", torch.float64: "f64"}


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(root) / "netprobe" / "native"


def compiler() -> str | None:
    """The C compiler the kernels are built with: $CC, else cc or gcc on the PATH."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _module_flags() -> list[str]:
    """What builds a kernel family as an extension module of this Python: its headers' folder;
    nothing where they are missing (a Python without its development files)."""
    include = sysconfig.get_paths().get("include")
    if not include or not os.path.exists(os.path.join(include, "Python.h")):
        return []
    # macOS links a module's Python symbols when the interpreter loads it
    darwin = ["-undefined", "dynamic_lookup"] if sys.platform == "darwin" else []
    return ["-DNETPROBE_MODULE", f"-I{include}", *darwin]


@functools.cache
def _load(name: str, module: bool) -> ctypes.CDLL | ModuleType | None:
    """`name`.c built (once per source, compiler, flags and CPU) and loaded: with `module`, as
    an extension module where Python's headers are found, else, or if that fails, with ctypes."""
    cc = compiler()
    if cc is None:
        return None
    extra = _module_flags() if module else []
    if extra:
        loaded = _open(cc, name, extra, "its kernels are called through ctypes")
        if loaded is not None:
            return loaded
    return _open(cc, name, [], "the probes use PyTorch kernels")


def _open(
    compiler: str, name: str, extra: list[str], otherwise: str
) -> ctypes.CDLL | ModuleType | None:
    source = HERE / f"{name}.c"
    key = hashlib.sha256()
    for path in sorted(HERE.glob("*.[ch]")):  # the source and the headers it includes
        key.update(path.read_bytes())
    python = [sys.version, sysconfig.get_config_var("EXT_SUFFIX") or ""] if extra else []
    key.update(" ".join([compiler, *FLAGS, *TUNED, *extra, *python, sys.platform, _cpu()]).encode())
    kind = "-module" if extra else ""
    target = cache_dir() / f"{name}{kind}-{key.hexdigest()[:16]}.so"
    try:
        tries = ([*FLAGS, *TUNED, *extra], [*FLAGS, *extra])
        if not target.exists() and not _build(compiler, source, target, tries, otherwise):
            return None
        return _import(f"_netprobe_{name}", target) if extra else ctypes.CDLL(str(target))
    except (OSError, ImportError) as exc:  # no writable cache, a full disk, a failed load
        warnings.warn(
            f"netprobe: the fused kernels of {source.name} are unavailable ({exc}); {otherwise}",
            stacklevel=4,
        )
        return None


def _import(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} is not an extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(
    compiler: str,
    source: Path,
    target: Path,
    tries: tuple[list[str], ...] = ([*FLAGS, *TUNED], FLAGS),
    otherwise: str = "the probes use PyTorch kernels",
    libraries: tuple[str, ...] = ("-lm",),
) -> bool:
    """Compiles `source` into `target` with the first flags of `tries` that work: tuned for this
    CPU where the compiler can. Where none does, warns with what happens `otherwise`."""
    target.parent.mkdir(parents=True, exist_ok=True)  # OSError: the caller's to report
    # Built under a temporary name and renamed: the runs of a sweep may build it at once.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    error = ""
    for flags in tries:
        done = subprocess.run(
            [compiler, *flags, str(source), "-o", tmp, *libraries], capture_output=True, text=True
        )
        if done.returncode == 0:
            os.replace(tmp, target)
            return True
        error = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
    os.unlink(tmp)
    warnings.warn(f"netprobe: compiling {source.name} failed ({error}); {otherwise}", stacklevel=5)
    return False


def _cxx() -> str | None:
    """The C++ compiler of tensors.cpp: $CXX, else c++ or g++ on the PATH."""
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


@functools.cache
def _tensor_checks() -> ModuleType | None:
    """tensors.cpp built (once per source, compiler, PyTorch and Python) against the installed
    PyTorch's headers and libraries, as an extension module; None where a C++ compiler, those
    headers or Python's are missing, or the build fails (warned once)."""
    cxx, python = _cxx(), _module_flags()
    root = Path(torch.__file__).parent
    headers, libraries = root / "include", root / "lib"
    if cxx is None or not python or not (headers / "torch" / "csrc").is_dir():
        return None
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    flags = ["-O2", "-std=c++20", "-fPIC", "-shared", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    flags += [f"-I{headers}", f"-I{headers / 'torch' / 'csrc' / 'api' / 'include'}", *python]
    link = (f"-L{libraries}", f"-Wl,-rpath,{libraries}", "-ltorch_python", "-ltorch_cpu", "-lc10")
    source = HERE / "tensors.cpp"
    key = hashlib.sha256(source.read_bytes() + (HERE / "accuracy.h").read_bytes())
    python_kind = [sys.version, sysconfig.get_config_var("EXT_SUFFIX") or ""]
    key.update(" ".join([cxx, *flags, *link, torch.__version__, *python_kind]).encode())
    target = cache_dir() / f"tensors-{key.hexdigest()[:16]}.so"
    otherwise = "the per-step kernels check their tensors in Python"
    # A build that failed is not tried again at every run (it takes ~20 s) while the same
    # compiler stands there, for a day: one that failed for a passing reason is tried again.
    failed = target.with_suffix(".failed")
    try:
        if not target.exists():
            stamp = _stamp(cxx)
            if _recent(failed, stamp):
                warnings.warn(
                    f"netprobe: tensors.cpp did not build here today ({failed}: remove it to "
                    f"try again now); {otherwise}",
                    stacklevel=3,
                )
                return None
            target.parent.mkdir(parents=True, exist_ok=True)
            # PyTorch's headers take a while: say why the first run pauses, once per machine.
            print(
                "netprobe: compiling tensors.cpp for this PyTorch, once (~20 s)",
                file=sys.stderr,
                flush=True,
            )
            if not _build(cxx, source, target, (flags,), otherwise, link):
                failed.write_text(stamp)
                return None
        return _import("_netprobe_tensors", target)
    except (OSError, ImportError) as exc:
        warnings.warn(f"netprobe: tensors.cpp is unavailable ({exc}); {otherwise}", stacklevel=3)
        return None


def _stamp(compiler: str) -> str:
    """What identifies a compiler's build: its path, size and modification time."""
    path = shutil.which(compiler) or compiler
    try:
        info = os.stat(path)
    except OSError:
        return path
    return f"{path} {info.st_size} {info.st_mtime_ns}"


def _recent(failed: Path, stamp: str, day: float = 86400.0) -> bool:
    """Whether `failed` records a failure of the compiler `stamp` names within the last day."""
    try:
        return failed.read_text() == stamp and time.time() - failed.stat().st_mtime < day
    except OSError:
        return False


def tensor_checks() -> ModuleType | None:
    """The compiled checks of the tensors the per-step kernels read (tensors.cpp: `pointers`;
    also `versions` and the batch `accuracy`), or None where they cannot be built or the fused
    kernels are off."""
    return _tensor_checks() if ENABLED else None


def library(name: str, module: bool = False) -> ctypes.CDLL | ModuleType | None:
    """The compiled `netprobe/native/<name>.c`, or None where it cannot be built or is off; with
    `module`, as an extension module where Python's headers are found (its functions take
    ints and floats, addresses as ints)."""
    return _load(name, module) if ENABLED else None


# Native byte order: the one float64 the kernels write.
FLOAT64 = np.dtype(np.float64)


class Block(NamedTuple):
    """A float64 host array [rows, cols] with adjacent columns for a kernel to write into, with
    its first element's address and its rows' stride in elements. Made by `HostBlocks.next` or
    `Block.of` only, which find these once: the kernels check `rows` and `cols` against what they
    write and trust the rest (right after a small model's backward, reading an array's layout
    costs µs a call)."""

    array: np.ndarray
    address: int
    rows: int
    cols: int
    ld: int

    @classmethod
    def of(cls, array: np.ndarray) -> Block:
        """`array` as a block; ValueError unless it is a writeable 2-D float64 array in this
        machine's byte order whose columns are adjacent and whose rows do not overlap."""
        shape, strides = array.shape, array.strides
        if array.dtype != FLOAT64 or len(shape) != 2:
            raise ValueError(f"an output of {array.dtype} {shape}: a 2-D float64 array wanted")
        if strides[1] != 8 or strides[0] % 8 or strides[0] < 8 * shape[1]:
            raise ValueError(f"an output of overlapping rows or spaced columns (strides {strides})")
        if not array.flags.writeable:
            raise ValueError("an output that is read-only")
        return cls(array, array.ctypes.data, shape[0], shape[1], strides[0] // 8)


class HostBlocks:
    """Fresh float64 host arrays [rows, cols], one per call: a step's record, written in place.
    They are cut from a pool (SIZE of them, fewer where they would take more than BYTES), all at
    once when it is made, because right after a small model's backward np.empty, .ctypes and
    even a view of a row cost µs each, and a step there is ~2 ms. A block is handed out once: the
    views keep their pool alive until the recorder has drained them."""

    SIZE, BYTES = 256, 1 << 18

    def __init__(self, rows: int, cols: int) -> None:
        self.rows, self.cols = rows, cols
        self._size = max(1, min(self.SIZE, self.BYTES // (8 * max(1, rows * cols))))
        self._blocks: list[Block] = []
        self._next = 0

    def next(self) -> Block:
        if self._next == len(self._blocks):
            rows, cols = self.rows, self.cols
            pool = np.empty((self._size, rows, cols))
            base, stride = pool.ctypes.data, pool.strides[0]
            self._blocks = [
                Block(view, base + i * stride, rows, cols, cols) for i, view in enumerate(pool)
            ]
            self._next = 0
        block = self._blocks[self._next]
        self._next += 1
        return block
