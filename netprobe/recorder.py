"""Recorder: holds what probes record as device tensors between flushes, and hands it to the
store as typed blocks after one device-to-host copy per table."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch

from netprobe.native import FLOAT64
from netprobe.store.schema import (
    HistogramBlock,
    MatrixBlock,
    histogram_table,
    matrix_table,
    scalar_table,
)

if TYPE_CHECKING:
    from netprobe.probes.base import StepState

Number = float | int | torch.Tensor


class Recorder:
    """Holds probe output as device tensors and moves it to the host in one copy per table."""

    def __init__(self, state: StepState) -> None:
        self.state = state  # where training is: each record is stamped with its step and epoch
        self._scalars: list[
            tuple[int, int, str, list[str], list[str], torch.Tensor | np.ndarray]
        ] = []
        self._hists: list[tuple[int, int, str, str, str, torch.Tensor, torch.Tensor]] = []
        self._matrices: list[tuple[int, int, str, str, str, str, torch.Tensor]] = []

    def scalars(
        self,
        probe: str,
        layers: list[str],
        metrics: list[str],
        values: torch.Tensor | np.ndarray | Number,
    ) -> None:
        """Values [len(layers), len(metrics)] for the current step: a tensor on any device, or
        host values (numbers, arrays: kept as float64, not float32, so lr 1e-3 stays 1e-3)."""
        if _host_ready(values):
            pass  # kept as they are, made one array at the drain: each call here counts µs
        elif not isinstance(values, torch.Tensor):
            values = np.asarray(values, dtype=np.float64)  # no tensor op: a CPU step counts µs
        elif values.requires_grad:
            values = values.detach()
        self._scalars.append((self.state.step, self.state.epoch, probe, layers, metrics, values))

    def histogram(
        self,
        probe: str,
        layer: str,
        source: str,
        edges: torch.Tensor,
        counts: torch.Tensor,
        below: torch.Tensor | int = 0,
        above: torch.Tensor | int = 0,
    ) -> None:
        """Counts per bin for `edges` (len(edges) = len(counts) + 1), plus out-of-range counts."""
        # The out-of-range counts ride at the end of the counts: one tensor to copy, not three.
        tail = torch.stack([torch.as_tensor(below), torch.as_tensor(above)]).to(counts.device)
        self._hists.append(
            (
                self.state.step,
                self.state.epoch,
                probe,
                layer,
                source,
                edges.detach(),
                torch.cat([counts.detach().reshape(-1), tail.reshape(-1)]),
            )
        )

    def matrix(self, probe: str, name: str, row: str, col: str, values: torch.Tensor) -> None:
        """A matrix (or vector) named `name` for the pair (`row`, `col`) of layers."""
        self._matrices.append(
            (self.state.step, self.state.epoch, probe, name, row, col, values.detach())
        )

    def __len__(self) -> int:
        return len(self._scalars) + len(self._hists) + len(self._matrices)

    def drain(self) -> dict[str, pa.Table]:
        """Everything buffered so far, on the host, as Arrow tables; the buffers are emptied."""
        tables: dict[str, pa.Table] = {}
        if self._scalars:
            values = _to_host_flat([v for *_, v in self._scalars], torch.float64)
            tables["scalars"] = scalar_table(self._scalars, values)
        if self._hists:
            edges = _to_host([h[5] for h in self._hists], torch.float64)
            counts = _to_host([h[6] for h in self._hists], torch.int64)
            tables["histograms"] = histogram_table(
                HistogramBlock(*head, e, c[:-2], int(c[-2]), int(c[-1]))
                for (*head, _, _), e, c in zip(self._hists, edges, counts)
            )
        if self._matrices:
            # float64 on disk: CKA needs it, and float32 matrices (C) are stored exactly.
            values = _to_host([m[6] for m in self._matrices], torch.float64)
            tables["matrices"] = matrix_table(
                MatrixBlock(*head, list(t.shape), v)
                for (*head, t), v in zip(self._matrices, values)
            )
        self._scalars, self._hists, self._matrices = [], [], []
        return tables


def _host_ready(values: object) -> bool:
    """Whether host values are float64 already, to be kept as they are until the drain: a
    float, a float64 array, a tuple of floats."""
    kind = type(values)
    if kind is np.ndarray:
        return values.dtype is FLOAT64  # type: ignore[attr-defined]
    return kind is float or kind is tuple and all(type(v) is float for v in values)  # type: ignore


def _to_host_flat(values: list[torch.Tensor | np.ndarray], dtype: torch.dtype) -> np.ndarray:
    """The values flattened and concatenated, in order, on the host: host arrays as they are
    (`dtype` already), tensors with one copy per device."""
    at = [i for i, v in enumerate(values) if isinstance(v, torch.Tensor)]
    if len(at) == len(values) and len({t.device for t in values}) == 1:
        # cat promotes mixed dtypes itself: one conversion for all, not one per tensor.
        return torch.cat([t.reshape(-1) for t in values]).to(dtype).cpu().numpy()
    pieces = list(values)
    for i, host in zip(at, _to_host([values[i] for i in at], dtype)):
        pieces[i] = host
    return np.concatenate(pieces, axis=None)


def _to_host(tensors: list[torch.Tensor], dtype: torch.dtype) -> list[np.ndarray]:
    """One device-to-host copy per device for a list of tensors; returns flat numpy pieces."""
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    out: list[np.ndarray] = [np.empty(0)] * len(tensors)
    for indices in by_device.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in indices]).to(dtype).cpu().numpy()
        ends = np.cumsum([tensors[i].numel() for i in indices]).tolist()
        for i, start, end in zip(indices, [0, *ends], ends):
            out[i] = flat[start:end]
    return out
