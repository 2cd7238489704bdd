"""The activations probe's statistics of one module output in two reads of its values: bindings
of hist.c for CPU tensors of float32 or float64 (see its header for the order of sums)."""

from __future__ import annotations

import ctypes
import functools

import torch

from netprobe.native import SUFFIXES, library

_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p


@functools.cache
def _bound(lib: ctypes.CDLL) -> ctypes.CDLL:
    for suffix in SUFFIXES.values():
        fn = getattr(lib, f"np_activation_stats_{suffix}")
        fn.argtypes = [_PTR, _I64, _I64, _PTR, _I64, _PTR, _PTR, ctypes.c_int]
    return lib


def activation_stats(
    flat: torch.Tensor, edges: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """[mean, std, skew, zero_frac, dead_frac] (float64) and counts [bins + 2] (int64) of the
    outputs `flat` [B, units] in float64 `edges`, or None where the PyTorch path serves: a device
    other than the CPU, another dtype, no values, or no compiled library."""
    if flat.device.type != "cpu" or flat.dtype not in SUFFIXES or flat.numel() == 0:
        return None
    lib = library("hist")
    return None if lib is None else compute(lib, flat, edges)


def compute(
    lib: ctypes.CDLL, flat: torch.Tensor, edges: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`activation_stats` by a given build of hist.c."""
    x = flat.contiguous()
    edges = edges.to(device="cpu", dtype=torch.float64).contiguous()
    stats = torch.empty(5, dtype=torch.float64)
    counts = torch.empty(len(edges) + 1, dtype=torch.int64)
    fn = getattr(_bound(lib), f"np_activation_stats_{SUFFIXES[x.dtype]}")
    status = fn(
        x.data_ptr(),
        *x.shape,
        edges.data_ptr(),
        len(edges) - 1,
        stats.data_ptr(),
        counts.data_ptr(),
        torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError("netprobe: no memory for the activations kernel's partial sums")
    return stats, counts
