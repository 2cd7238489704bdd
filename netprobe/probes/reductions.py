"""Dtypes and constants the probes' device reductions share."""

from __future__ import annotations

import functools

import torch

from netprobe.native import Block
from netprobe.native.step import Grads, MissingGrad, Read, Unreadable, kernels


def stat_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    """float64 for float64 tensors, else float32: statistics of low-precision tensors in float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


@functools.lru_cache(maxsize=64)
def device_sizes(
    sizes: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.int64
) -> torch.Tensor:
    """`sizes` as a tensor on `device`, made once per device and set of tensors: a per-step
    torch.tensor(...) would be a blocking host-to-device copy every step."""
    return torch.tensor(sizes, dtype=dtype, device=device)


def to_float64(x: torch.Tensor) -> torch.Tensor:
    """x in float64; on the CPU for a device without float64 (Apple's MPS), else where it is."""
    if x.device.type == "mps":
        x = x.cpu()
    return x.to(torch.float64)


class TotalNorm:
    """‖g‖₂ over the gradients of a fixed list of parameters: a float from one fused pass on the
    CPU when every parameter has one, else a device scalar, a norm per tensor and a norm of
    those (nothing read back, but for a sparse gradient's count of entries, which waits for the
    device as it coalesces), and None where none has one. Sparse gradients (an
    `nn.Embedding(sparse=True)`'s) count by their values, duplicates summed; the first gradient
    the fused pass cannot read in place (sparse, or without memory of its own) ends the fused
    pass for the run."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self._params = params
        self._grads = Grads(tuple(params))
        self._fused = kernels(params)
        if self._fused is not None:
            self._fused.keeps_reads = True

    def __call__(self) -> torch.Tensor | float | None:
        if self._fused is not None:
            try:
                return self._fused.norm(self._grads)
            except MissingGrad:
                pass
            except Unreadable:
                self._fused = None
        grads = [g for p in self._params if (g := p.grad) is not None]
        if not grads:
            return None
        return torch.linalg.vector_norm(torch.stack(l2_norms(grads, stat_dtype(grads))))

    @property
    def fused(self) -> bool:
        return self._fused is not None

    def take_read(self) -> Read | None:
        """The last call's gradients as a native Read, where the fused kernel read them all in
        place and checked them in Python: for probes' kernels to read them again this step
        without checking them again."""
        return None if self._fused is None else self._fused.take_read()

    def with_rows(self, out: Block) -> float | None:
        """The same norm (the same bits, but for a NaN's sign) and, from the same read, each
        gradient's [l1, l2, mean_abs, max_abs, nonfinite] into `out`, where the fused kernel
        serves every parameter; None, with nothing written, elsewhere."""
        if self._fused is None:
            return None
        try:
            return self._fused.grad_stats(self._grads, out)
        except MissingGrad:
            return None
        except Unreadable:
            self._fused = None
            return None


def l2_norms(tensors: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """‖t‖₂ of each tensor, in `dtype`, in order: strided ones in one foreach kernel; a sparse
    one (an `nn.Embedding(sparse=True)`'s gradient) from its values once coalesced (an index
    given twice is one entry, the sum of both)."""
    dense = [t for t in tensors if t.layout is torch.strided]
    if len(dense) == len(tensors):
        return list(torch._foreach_norm(tensors, 2, dtype=dtype))
    norms = iter(torch._foreach_norm(dense, 2, dtype=dtype) if dense else ())
    return [next(norms) if t.layout is torch.strided else _sparse_norm(t, dtype) for t in tensors]


def _sparse_norm(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Coalescing counts the entries: on a GPU this waits for the device. The compressed layouts
    # hold each index once.
    values = t.coalesce().values() if t.layout is torch.sparse_coo else t.values()
    return torch.linalg.vector_norm(values, dtype=dtype)
