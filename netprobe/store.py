"""The run directory (SPEC §3): the only code that reads or writes Parquet and run.json."""

from __future__ import annotations

import json
import os
import socket
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

RUN_FILE = "run.json"
CONFIG_FILE = ".hydra/config.yaml"  # the composed config, as Hydra writes it
STATUSES = ("running", "completed", "failed", "diverged", "interrupted")
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
            ("values", pa.list_(pa.float32())),
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


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _atomic_write_bytes(path: Path, write: Any) -> None:
    """Write via `write(tmp_path)` to a temporary name beside `path`, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: Path, data: dict[str, Any]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())

    _atomic_write_bytes(path, write)


def write_text(path: Path, text: str) -> None:
    """A text file (an exported query result) written atomically."""
    _atomic_write_bytes(path, lambda tmp: tmp.write_text(text))


def write_parquet(path: Path, table: pa.Table) -> None:
    """A Parquet file outside any run (an exported query result) written atomically."""
    _atomic_write_bytes(path, lambda tmp: pq.write_table(table, tmp))


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


def rows_table(table: str, rows: list[dict[str, Any]]) -> pa.Table:
    """Build a histograms, matrices, layers or graph table from row dicts."""
    schema = SCHEMAS[table]
    columns = {name: [r[name] for r in rows] for name in schema.names}
    arrays = []
    for field in schema:
        if pa.types.is_dictionary(field.type):
            arrays.append(pa.array(columns[field.name], pa.string()).dictionary_encode())
        else:
            arrays.append(pa.array(columns[field.name], field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


class RunWriter:
    """Owns one run directory: run.json's lifecycle and the numbered Parquet part files."""

    def __init__(
        self, path: str | os.PathLike, info: dict[str, Any], *, resume: bool = False
    ) -> None:
        from netprobe.lifecycle import RunLock, check_new_run_dir

        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        # One writer per directory; a new run never writes into an old one (resuming does).
        self.lock = RunLock(self.path).acquire()
        try:
            if not resume:
                check_new_run_dir(self.path)
        except BaseException:
            self.lock.release()
            raise
        self._parts = {t: _next_part(self.path / t) for t in TABLES}
        # Resuming keeps what run.json said (when it started, ...) and notes when it went on.
        before = Run(self.path).info if resume else {}
        before.pop("stop_reason", None)
        resumed = [*before.get("resumed_at", []), now_iso()] if resume else []
        self.info = {
            **before,
            "netprobe_version": _version(),
            "status": "running",
            "started_at": before.get("started_at", now_iso()),
            "ended_at": None,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "error": None,
            **({"resumed_at": resumed} if resumed else {}),
            **info,
        }
        self._write_info()

    def update(self, **fields: Any) -> None:
        self.info.update(fields)
        self._write_info()

    def close(self, status: str, error: str | None = None, **fields: Any) -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}; valid: {', '.join(STATUSES)}")
        try:
            self.update(status=status, error=error, ended_at=now_iso(), **fields)
        finally:
            self.lock.release()

    def _write_info(self) -> None:
        write_json(self.path / RUN_FILE, self.info)

    def write_table(self, name: str, table: pa.Table) -> None:
        """Write a whole single-file table (layers.parquet, graph.parquet)."""
        _atomic_write_bytes(self.path / f"{name}.parquet", lambda tmp: pq.write_table(table, tmp))

    def append(self, name: str, table: pa.Table) -> Path | None:
        """Write `table` as the next part file of `name`; each part is complete on its own."""
        if table.num_rows == 0:
            return None
        folder = self.path / name
        folder.mkdir(exist_ok=True)
        part = folder / f"part-{self._parts[name]:06d}.parquet"
        self._parts[name] += 1
        _atomic_write_bytes(part, lambda tmp: pq.write_table(table, tmp, **_write_options(table)))
        return part


def drop_rows_after(path: str | os.PathLike, epoch: int) -> int:
    """Remove every stored row of an epoch after `epoch` (resuming from the checkpoint taken at
    its end); part files are rewritten atomically, emptied ones removed. Returns rows removed."""
    removed = 0
    for name in TABLES:
        for part in sorted((Path(path) / name).glob("part-*.parquet")):
            table = pq.read_table(part)
            keep = pc.less_equal(table["epoch"], epoch)
            kept = table.filter(keep)
            if kept.num_rows == table.num_rows:
                continue
            removed += table.num_rows - kept.num_rows
            if kept.num_rows == 0:
                part.unlink()
            else:
                _atomic_write_bytes(part, lambda tmp, t=kept: pq.write_table(t, tmp))
    return removed


def _write_options(table: pa.Table) -> dict[str, Any]:
    """Dictionary pages for the name columns only, and statistics only where readers filter:
    dictionary-encoding random float values wastes a third of the write time and space."""
    names = [
        f.name for f in table.schema if pa.types.is_dictionary(f.type) or f.type == pa.string()
    ]
    keys = [
        f.name
        for f in table.schema
        if not (pa.types.is_floating(f.type) or pa.types.is_list(f.type))
    ]
    return {"use_dictionary": names, "write_statistics": keys}


def _next_part(folder: Path) -> int:
    parts = sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []
    return int(parts[-1].stem.split("-")[1]) + 1 if parts else 0


def _version() -> str:
    from netprobe import __version__

    return __version__


# ---------------------------------------------------------------- reading


class Run:
    """A stored run: run.json as `.info`, the composed config, and each table as a DataFrame."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        with open(self.path / RUN_FILE) as f:
            info = json.load(f)
        if not isinstance(info, dict):
            raise ValueError(f"{self.path / RUN_FILE} holds {type(info).__name__}, not an object")
        self.info: dict[str, Any] = info
        self._cache: dict[str, tuple[tuple, pa.Table]] = {}

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, status={self.status!r})"

    @property
    def status(self) -> str:
        """run.json's status, or `crashed` when it says `running` but its process is gone."""
        from netprobe.lifecycle import effective_status

        return effective_status(self.info)

    @property
    def config(self) -> dict[str, Any] | None:
        path = self.path / CONFIG_FILE
        if not path.exists():
            return None
        from omegaconf import OmegaConf

        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)

    def scalars(
        self, probe: str | None = None, metric: str | None = None, layer: str | None = None
    ) -> pd.DataFrame:
        return self._read("scalars", probe=probe, metric=metric, layer=layer)

    def histograms(
        self, probe: str | None = None, layer: str | None = None, source: str | None = None
    ) -> pd.DataFrame:
        return self._read("histograms", probe=probe, layer=layer, source=source)

    def matrices(self, probe: str | None = None, name: str | None = None) -> pd.DataFrame:
        return self._read("matrices", probe=probe, name=name)

    def layers(self) -> pd.DataFrame:
        return _read_file(self.path / "layers.parquet", "layers")

    def graph(self) -> pd.DataFrame:
        return _read_file(self.path / "graph.parquet", "graph")

    def table(self, table: str) -> pa.Table:
        """All rows of `scalars`, `histograms` or `matrices` as one Arrow table."""
        return self._table(table)

    def _read(self, table: str, **equal: str | None) -> pd.DataFrame:
        data = self._table(table)
        for column, value in equal.items():
            if value is not None:
                data = data.filter(pc.equal(data[column], value))
        return plain(data)

    def _table(self, table: str) -> pa.Table:
        """All part files of `table` as one Arrow table, read once while the parts stay the same
        (figures query one table many times; a run still training gets new parts)."""
        parts = part_files(self.path, table)
        key = tuple((p.name, p.stat().st_size) for p in parts)
        cached = self._cache.get(table)
        if cached is not None and cached[0] == key:
            return cached[1]
        data = _read_parts(parts, table)
        self._cache[table] = (key, data)
        return data


def _read_parts(parts: list[Path], table: str) -> pa.Table:
    if not parts:
        return SCHEMAS[table].empty_table()
    try:
        # One multi-threaded scan of every part: twice as fast as a read per file.
        return pq.read_table([str(p) for p in parts])
    except (pa.ArrowException, OSError, ValueError):
        pass  # some part is damaged or differs: read them one by one, skipping the bad ones
    tables = [t for _, t in _each_readable(parts, stacklevel=5)]
    if not tables:
        return SCHEMAS[table].empty_table()
    return pa.concat_tables(tables, promote_options="permissive")


def _each_readable(parts: list[Path], stacklevel: int) -> Iterator[tuple[Path, pa.Table]]:
    """Each part file that reads whole, with its table; each one that does not is skipped with a
    warning that names it."""
    for part in parts:
        try:
            yield part, pq.read_table(part)
        except (pa.ArrowException, OSError, ValueError) as exc:
            warnings.warn(
                f"skipping unreadable part file {part}: {_short(exc)}", stacklevel=stacklevel
            )


def part_files(run_dir: str | os.PathLike, table: str) -> list[Path]:
    """The part files of one of a run's tables (`scalars`, `histograms`, `matrices`), in order."""
    folder = Path(run_dir) / table
    return sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []


def readable_parts(parts: list[Path]) -> list[Path]:
    """The part files that read whole; the others are skipped with the warning `load` gives."""
    return [part for part, _ in _each_readable(parts, stacklevel=4)]


def _read_file(path: Path, table: str) -> pd.DataFrame:
    if not path.exists():
        return plain(SCHEMAS[table].empty_table())
    try:
        return plain(pq.read_table(path))
    except (pa.ArrowException, OSError, ValueError) as exc:
        warnings.warn(f"skipping unreadable file {path}: {_short(exc)}", stacklevel=3)
        return plain(SCHEMAS[table].empty_table())


def _short(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def plain(table: pa.Table) -> pd.DataFrame:
    """To pandas with dictionary columns as plain strings, so users never meet categoricals."""
    fields = [
        pa.field(f.name, pa.string()) if pa.types.is_dictionary(f.type) else f for f in table.schema
    ]
    return table.cast(pa.schema(fields)).to_pandas()


def load(path: str | os.PathLike) -> Run:
    """Open the run stored at `path` (a directory holding run.json)."""
    path = Path(path)
    if not (path / RUN_FILE).exists():
        raise FileNotFoundError(f"no {RUN_FILE} in {path}: not a netprobe run directory")
    return Run(path)


def find_runs(path: str | os.PathLike) -> Iterator[Path]:
    """Every run directory at or beneath `path`, in sorted order."""
    path = Path(path)
    if (path / RUN_FILE).exists():
        yield path
        return
    yield from sorted(_runs_beneath(path))


# What a run directory holds besides run.json: never searched for runs (a sweep of thousands of
# runs holds hundreds of thousands of part files, and listing them is most of the search's cost).
_RUN_CONTENTS = {*TABLES, "checkpoints", "figures", "tb", ".hydra"}


def _runs_beneath(path: Path) -> Iterator[Path]:
    try:
        entries = list(os.scandir(path))
    except OSError:
        return
    is_run = any(e.name == RUN_FILE for e in entries)
    if is_run:
        yield path
    for entry in entries:
        if entry.is_dir(follow_symlinks=False) and not (is_run and entry.name in _RUN_CONTENTS):
            yield from _runs_beneath(Path(entry.path))


def read_runs(path: str | os.PathLike) -> list[Run]:
    """Every run at or beneath `path`; a run whose run.json cannot be read is skipped, with a
    warning."""
    runs = []
    for p in find_runs(path):
        try:
            runs.append(Run(p))
        except (OSError, ValueError) as exc:
            warnings.warn(f"skipping run {p}: damaged {RUN_FILE} ({_short(exc)})", stacklevel=2)
    return runs
