"""The tables' schemas (SPEC §3) and the builders that turn typed blocks into Arrow tables:
the only code that knows the column names."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

TABLES = ("scalars", "histograms", "matrices")

_dict_str = pa.dictionary(pa.int32(), pa.string())
SCHEMAS: dict[str, pa.Schema] = {
    "scalars": pa.schema(
        [
            ("step", pa.int64()),
            ("epoch", pa.int32()),
            ("probe", _dict_str),
            ("layer", _dict_str),
            ("metric", _dict_str),
            ("value", pa.float64()),
        ]
    ),
    "histograms": pa.schema(
        [
            ("step", pa.int64()),
            ("epoch", pa.int32()),
            ("probe", _dict_str),
            ("layer", _dict_str),
            ("source", _dict_str),
            ("edges", pa.list_(pa.float64())),
            ("counts", pa.list_(pa.int64())),
            ("below", pa.int64()),
            ("above", pa.int64()),
        ]
    ),
    "matrices": pa.schema(
        [
            ("step", pa.int64()),
            ("epoch", pa.int32()),
            ("probe", _dict_str),
            ("name", _dict_str),
            ("row", _dict_str),
            ("col", _dict_str),
            ("shape", pa.list_(pa.int32())),
            ("values", pa.list_(pa.float64())),
        ]
    ),
    "layers": pa.schema(
        [
            ("order", pa.int32()),
            ("module", pa.string()),
            ("param", pa.string()),
            ("type", pa.string()),
            ("shape", pa.list_(pa.int32())),
            ("numel", pa.int64()),
        ]
    ),
    "graph": pa.schema([("source", pa.string()), ("target", pa.string())]),
}


def _dict_array(codes: np.ndarray, names: list[str]) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(pa.array(codes, pa.int32()), pa.array(names, pa.string()))


@dataclass
class ScalarBlock:
    """One probe's scalars in columnar form: `values[i, j]` is (`layers[i]`, `metrics[j]`)."""

    step: int
    epoch: int
    probe: str
    layers: list[str]
    metrics: list[str]
    values: np.ndarray  # [len(layers), len(metrics)] float64


def scalar_table(
    blocks: Iterable[ScalarBlock | tuple[int, int, str, list[str], list[str], Any]],
    values: np.ndarray | None = None,
) -> pa.Table:
    """Assemble many blocks into one scalars table without per-row Python work.

    Blocks are ScalarBlocks or (step, epoch, probe, layers, metrics, values) tuples; `values`, when
    given, holds every block's values flat, in block order, and the blocks' own are ignored.
    Blocks with the same probe, layers and metrics (one per step from each probe) share their
    dictionary codes, so the Python work is one dict lookup per block; the rest is numpy.
    """
    blocks = [
        (b.step, b.epoch, b.probe, b.layers, b.metrics, b.values)
        if isinstance(b, ScalarBlock)
        else b
        for b in blocks
    ]
    probes, layers, metrics = _Interner(), _Interner(), _Interner()
    shapes: dict[tuple, tuple[int, np.ndarray, np.ndarray]] = {}
    n_blocks = len(blocks)
    sizes = np.empty(n_blocks, np.int64)
    steps = np.empty(n_blocks, np.int64)
    epochs = np.empty(n_blocks, np.int32)
    p_codes = np.empty(n_blocks, np.int32)
    l_parts, m_parts = [], []
    for i, (step, epoch, probe, layer_names, metric_names, _) in enumerate(blocks):
        key = (probe, tuple(layer_names), tuple(metric_names))
        codes = shapes.get(key)
        if codes is None:
            n_m = len(metric_names)
            codes = shapes[key] = (
                probes.code(probe),
                np.repeat(layers.codes(layer_names), n_m),
                np.tile(metrics.codes(metric_names), len(layer_names)),
            )
        p_codes[i], l_code, m_code = codes
        sizes[i], steps[i], epochs[i] = len(l_code), step, epoch
        l_parts.append(l_code)
        m_parts.append(m_code)
    cat = lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype)  # noqa: E731
    if values is None:
        values = cat([np.asarray(b[5], np.float64).reshape(-1) for b in blocks], np.float64)
    if len(values) != sizes.sum():
        raise ValueError(f"{len(values)} values for {sizes.sum()} (layer, metric) pairs")
    return pa.Table.from_arrays(
        [
            pa.array(np.repeat(steps, sizes)),
            pa.array(np.repeat(epochs, sizes)),
            _dict_array(np.repeat(p_codes, sizes), probes.names),
            _dict_array(cat(l_parts, np.int32), layers.names),
            _dict_array(cat(m_parts, np.int32), metrics.names),
            pa.array(np.asarray(values, np.float64)),
        ],
        schema=SCHEMAS["scalars"],
    )


class _Interner:
    def __init__(self) -> None:
        self.names: list[str] = []
        self._index: dict[str, int] = {}

    def code(self, name: str) -> int:
        if name not in self._index:
            self._index[name] = len(self.names)
            self.names.append(name)
        return self._index[name]

    def codes(self, names: list[str]) -> np.ndarray:
        return np.fromiter((self.code(n) for n in names), np.int32, len(names))


def rows_table(table: str, rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Build any table but scalars from row dicts keyed by column name."""
    rows = list(rows)
    return _columns_table(table, {name: [r[name] for r in rows] for name in SCHEMAS[table].names})


@dataclass
class HistogramBlock:
    """One histogram: `counts[i]` values in [`edges[i]`, `edges[i + 1]`), and those outside."""

    step: int
    epoch: int
    probe: str
    layer: str
    source: str
    edges: np.ndarray  # float64, len(counts) + 1
    counts: np.ndarray  # int64
    below: int
    above: int


@dataclass
class MatrixBlock:
    """One matrix (or vector) `name` for the pair (`row`, `col`) of layers, values flat."""

    step: int
    epoch: int
    probe: str
    name: str
    row: str
    col: str
    shape: list[int]
    values: np.ndarray  # float64, row-major


def histogram_table(blocks: Iterable[HistogramBlock]) -> pa.Table:
    return _fields_table("histograms", blocks)


def matrix_table(blocks: Iterable[MatrixBlock]) -> pa.Table:
    return _fields_table("matrices", blocks)


def layers_table(layers: Iterable[Any]) -> pa.Table:
    """The model's layers from objects with the layers columns as attributes
    (`netprobe.structure.LayerInfo`)."""
    return _fields_table("layers", layers)


def graph_table(edges: Iterable[tuple[str, str]]) -> pa.Table:
    """The data-flow edges (source module, target module)."""
    edges = list(edges)
    return _columns_table(
        "graph", {"source": [s for s, _ in edges], "target": [t for _, t in edges]}
    )


def _fields_table(table: str, blocks: Iterable[Any]) -> pa.Table:
    """Objects whose attributes are the table's columns, one row each."""
    blocks = list(blocks)
    names = SCHEMAS[table].names
    return _columns_table(table, {name: [getattr(b, name) for b in blocks] for name in names})


def _columns_table(table: str, columns: Mapping[str, list[Any]]) -> pa.Table:
    schema = SCHEMAS[table]
    arrays = []
    for field in schema:
        if pa.types.is_dictionary(field.type):
            arrays.append(pa.array(columns[field.name], pa.string()).dictionary_encode())
        else:
            arrays.append(pa.array(columns[field.name], field.type))
    return pa.Table.from_arrays(arrays, schema=schema)
