"""The run directory (SPEC §3): the only code that reads or writes Parquet and run.json."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from netprobe.errors import ConfigError, StorageError, first_line

if TYPE_CHECKING:
    import pandas as pd  # Arrow's to_pandas imports it when a table is read: `ls` never does

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


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Write `path` whole or not at all (SPEC §3): `write(tmp)` fills a temporary name beside it,
    which is fsynced and renamed into place, and the directory fsynced, so that neither a crash
    nor a power loss leaves a half-written or empty file. A failure leaves no temporary file
    behind and raises StorageError naming `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except StorageError:
        raise
    except OSError as exc:
        raise StorageError(path, exc) from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some filesystems cannot sync a directory; that is no reason to fail a run.
        if not (path.is_dir() and exc.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF)):
            raise
    finally:
        os.close(fd)


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str)))


def write_text(path: Path, text: str) -> None:
    """A text file (an exported query result) written atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_parquet(path: Path, table: pa.Table) -> None:
    """A Parquet file outside any run (an exported query result) written atomically."""
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


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
    """Owns one run directory: run.json's lifecycle and the numbered Parquet part files.

    Nothing is written before the directory's lock is held and the directory checked: a new run
    needs a folder holding no run, a resumed one (`resume`) its own run. Resuming from the end of
    epoch `info["epochs_done"] - 1` drops the stored rows of later epochs first.
    """

    def __init__(
        self, path: str | os.PathLike, info: dict[str, Any], *, resume: bool = False
    ) -> None:
        from netprobe.lifecycle import RunLock, check_new_run_dir

        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(self.path, exc) from None
        # One writer per directory; a new run never writes into an old one (resuming does).
        self.lock = RunLock(self.path).acquire()
        try:
            if resume:
                before = read_info(self.path)
                end_parts = before.pop("end_parts", None)
                if "epochs_done" in info:
                    drop_rows_after(self.path, info["epochs_done"] - 1, end_parts)
            else:
                check_new_run_dir(self.path)
                before = {}
            _remove_temp_files(self.path)
        except BaseException:
            self.lock.release()
            raise
        self._parts = {t: _next_part(self.path / t) for t in TABLES}
        # Rows a failed write left in memory, per table, written first at the next try.
        self._unwritten: dict[str, pa.Table] = {}
        # Resuming keeps what run.json said (when it started, ...) and notes when it went on.
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
        try:
            self._write_info()
        except BaseException:
            self.lock.release()
            raise

    def update(self, **fields: Any) -> None:
        self.info.update(fields)
        self._write_info()

    def close(self, status: str, error: str | None = None, **fields: Any) -> None:
        """Record the final status; a run whose rows could not all be written is `failed`."""
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}; valid: {', '.join(STATUSES)}")
        first = self.first_unwritten_step()
        if first is not None:
            lost = f"the rows from step {first} on could not be written"
            error = f"{error}; {lost}" if error else lost
            status = "failed" if status == "completed" else status
        try:
            self.update(status=status, error=error, ended_at=now_iso(), **fields)
        finally:
            self.lock.release()

    def _write_info(self) -> None:
        write_json(self.path / RUN_FILE, self.info)

    def write_table(self, name: str, table: pa.Table) -> None:
        """Write a whole single-file table (layers.parquet, graph.parquet)."""
        atomic_write(self.path / f"{name}.parquet", lambda tmp: pq.write_table(table, tmp))

    def append(self, name: str, table: pa.Table) -> Path | None:
        """Write `table` as the next part file of `name`; each part is complete on its own."""
        if table.num_rows == 0:
            return None
        folder = self.path / name
        part = folder / f"part-{self._parts[name]:06d}.parquet"
        try:
            folder.mkdir(exist_ok=True)
        except OSError as exc:
            raise StorageError(folder, exc) from None
        atomic_write(part, lambda tmp: pq.write_table(table, tmp, **_write_options(table)))
        self._parts[name] += 1
        return part

    def append_all(self, tables: dict[str, pa.Table]) -> None:
        """Append each table. One that cannot be written stays in memory, ahead of the next
        call's rows of that table, while the others are written all the same; the first failure
        is raised once every table has had its try."""
        failure: StorageError | None = None
        for name in dict.fromkeys([*self._unwritten, *tables]):
            pieces = [t for t in (self._unwritten.pop(name, None), tables.get(name)) if t]
            if not pieces:
                continue
            table = pa.concat_tables(pieces) if len(pieces) > 1 else pieces[0]
            try:
                self.append(name, table)
            except StorageError as exc:
                self._unwritten[name] = table
                failure = failure or exc
        if failure is not None:
            raise failure

    def mark_end_captures(self) -> None:
        """The parts written from now on hold the run's end captures (noted in run.json at
        close): a resumed run drops them and takes its own at its end."""
        self.info["end_parts"] = dict(self._parts)

    def first_unwritten_step(self) -> int | None:
        """The first step of the rows still held in memory after a failed write, if any."""
        steps = [pc.min(t["step"]).as_py() for t in self._unwritten.values()]
        return min(steps) if steps else None


def _remove_temp_files(path: Path) -> None:
    """The temporary files of writes that a killed process never finished (only the directory's
    lock holder may call this: another writer's files would be in use)."""
    for tmp in [*path.glob(".*.tmp-*"), *path.glob("*/.*.tmp-*")]:
        with contextlib.suppress(OSError):
            tmp.unlink()


def read_info(path: str | os.PathLike) -> dict[str, Any]:
    """The run.json of the run at `path`; ConfigError (one line) when it is missing or damaged."""
    path = Path(path)
    if not (path / RUN_FILE).exists():
        raise ConfigError(f"no run in {path} to resume: it holds no {RUN_FILE}")
    try:
        return Run(path).info
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{path / RUN_FILE} is damaged ({first_line(exc)}); the run cannot be resumed"
        ) from None


def drop_rows_after(
    path: str | os.PathLike, epoch: int, end_parts: dict[str, int] | None = None
) -> int:
    """Remove every stored row of an epoch after `epoch` (resuming from the checkpoint taken at
    its end), and the parts numbered from `end_parts[table]` on: the end captures of a run that
    finished, which a resumed run takes again at its own end. Part files are rewritten
    atomically, emptied ones removed. Returns the number of rows removed.

    Every part is read before any is changed: a damaged one is refused (ConfigError) with the
    directory untouched, since resuming past it would leave a hole in the stored steps."""
    cuts: list[tuple[Path, int, pa.Table | None]] = []  # part, rows removed, rows kept
    for name in TABLES:
        end = (end_parts or {}).get(name)
        for part in sorted((Path(path) / name).glob("part-*.parquet")):
            try:
                rows = pq.read_metadata(part).num_rows  # a zero-byte part fails here
                if end is not None and _part_number(part) >= end:
                    cuts.append((part, rows, None))
                    continue
                if rows == 0:
                    continue
                last = pc.max(pq.read_table(part, columns=["epoch"])["epoch"]).as_py()
                if last > epoch:
                    table = pq.read_table(part)
                    kept = table.filter(pc.less_equal(table["epoch"], epoch))
                    cuts.append((part, rows - kept.num_rows, kept))
            except (pa.ArrowException, OSError, ValueError) as exc:
                raise ConfigError(
                    f"{part} is damaged ({first_line(exc)}); resuming would leave its rows out: "
                    "move it out of the run to resume without them, or start a new run"
                ) from None
    for part, _, kept in cuts:
        if kept is None or kept.num_rows == 0:
            part.unlink()
        else:
            atomic_write(part, lambda tmp, t=kept: pq.write_table(t, tmp))
    return sum(removed for _, removed, _ in cuts)


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
    return _part_number(parts[-1]) + 1 if parts else 0


def _part_number(part: Path) -> int:
    return int(part.stem.split("-")[1])


def _version() -> str:
    from netprobe import __version__

    return __version__


# ---------------------------------------------------------------- reading


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted keys: {"optim": {"lr": 0.1}} → {"optim.lr": 0.1};
    lists and empty mappings stay values; anything but a mapping gives {}."""
    flat: dict[str, Any] = {}
    if not isinstance(tree, Mapping):
        return flat
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The run.json of the run at `path`; OSError or ValueError when it is missing or damaged."""
    with open(Path(path) / RUN_FILE) as f:
        info = json.load(f)
    if not isinstance(info, dict):
        raise ValueError(f"{Path(path) / RUN_FILE} holds {type(info).__name__}, not an object")
    return info


class Run:
    """A stored run: run.json as `.info`, the composed config, and each table as a DataFrame."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.info: dict[str, Any] = manifest(self.path)
        self._cache: dict[str, tuple[tuple, Any]] = {}

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, status={self.status!r})"

    @property
    def status(self) -> str:
        """run.json's status, or `crashed` when it says `running` but its process is gone."""
        from netprobe.lifecycle import effective_status

        return effective_status(self.info)

    @property
    def config(self) -> dict[str, Any] | None:
        """The composed config (`.hydra/config.yaml`), parsed once; None without one."""
        if "config" not in self._cache:
            path = self.path / CONFIG_FILE
            config = None
            if path.exists():
                import yaml

                # The file as written, interpolations unresolved: what OmegaConf.load gives,
                # ten times faster (the doctor reads a thousand of them).
                with open(path) as f:
                    config = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
            self._cache["config"] = ((), config)
        return self._cache["config"][1]

    def scalars(
        self, probe: str | None = None, metric: str | None = None, layer: str | None = None
    ) -> pd.DataFrame:
        return self._read("scalars", probe=probe, metric=metric, layer=layer)

    def scalar_groups(
        self, probes: Iterable[str], metrics: Iterable[str] | None = None
    ) -> dict[tuple[str, str], dict[str, np.ndarray]]:
        """The scalars of `probes` (and `metrics`) split by (probe, metric), each as numpy
        columns step, epoch, layer, value in stored order: one pass over the table, where a
        `scalars()` call per metric would filter and convert it anew each time (the doctor
        reads a thousand runs this way)."""
        data = self._table("scalars")
        for column, wanted in (("probe", probes), ("metric", metrics)):
            if wanted is not None:
                keep = pc.is_in(data[column].cast(pa.string()), pa.array(list(wanted), pa.string()))
                data = data.filter(keep)
        if data.num_rows == 0:
            return {}
        codes, names = {}, {}
        for column in ("probe", "metric", "layer"):
            chunk = data[column].cast(pa.string()).dictionary_encode().combine_chunks()
            codes[column] = chunk.indices.to_numpy(zero_copy_only=False)
            names[column] = np.array(chunk.dictionary.to_pylist(), dtype=object)
        key = codes["probe"].astype(np.int64) * len(names["metric"]) + codes["metric"]
        order = np.argsort(key, kind="stable")
        bounds = np.flatnonzero(np.diff(key[order])) + 1
        columns = {
            "step": data["step"].to_numpy(),
            "epoch": data["epoch"].to_numpy(),
            "value": data["value"].to_numpy(),
        }
        groups = {}
        for rows in np.split(order, bounds):
            first = rows[0]
            name = (names["probe"][codes["probe"][first]], names["metric"][codes["metric"][first]])
            groups[name] = {
                "step": columns["step"][rows],
                "epoch": columns["epoch"][rows],
                "layer": names["layer"][codes["layer"][rows]],
                "value": columns["value"][rows],
            }
        return groups

    def histograms(
        self, probe: str | None = None, layer: str | None = None, source: str | None = None
    ) -> pd.DataFrame:
        return self._read("histograms", probe=probe, layer=layer, source=source)

    def matrices(self, probe: str | None = None, name: str | None = None) -> pd.DataFrame:
        return self._read("matrices", probe=probe, name=name)

    def matrix(
        self,
        name: str,
        epoch: int | None = None,
        step: int | None = None,
        *,
        probe: str | None = None,
        row: str | None = None,
        col: str | None = None,
    ) -> pd.DataFrame:
        """One capture of matrix `name` as a labelled 2-D DataFrame (`netprobe.matrices`): at
        `step`, else the last capture of `epoch`, else the last capture; `row`/`col` pick a pair."""
        from netprobe.matrices import labelled, pick_capture

        df = self.matrices(probe=probe, name=name)
        for column, value in (("row", row), ("col", col)):
            if value is not None:
                df = df[df[column] == value]
        if df.empty:
            names = ", ".join(sorted(set(self.matrices(probe=probe)["name"]))) or "none"
            raise KeyError(f"no matrix {name!r} (row={row!r}, col={col!r}) stored; names: {names}")
        order = list(dict.fromkeys(self.layers()["module"]))
        return labelled(pick_capture(df, epoch, step), name, order)

    def layers(self) -> pd.DataFrame:
        return self._file("layers")

    def graph(self) -> pd.DataFrame:
        return self._file("graph")

    def _file(self, table: str) -> pd.DataFrame:
        """A single-file table, read once while the file stays the same."""
        path = self.path / f"{table}.parquet"
        key = (path.stat().st_mtime_ns, path.stat().st_size) if path.exists() else ()
        cached = self._cache.get(table)
        if cached is None or cached[0] != key:
            cached = self._cache[table] = (key, _read_file(path, table))
        return cached[1].copy()

    def preload(self) -> None:
        """Read every table now (once), so that later queries, in this process or in processes
        forked from it, cost no disk reads."""
        for table in TABLES:
            self._table(table)
        self._file("layers")
        self._file("graph")
        _ = self.config

    def inputs(self) -> list[tuple[str, int, int]]:
        """(path within the run, size, mtime_ns) of every file the stored data consist of: what a
        figure drawn from this run depends on."""
        files = [self.path / RUN_FILE, self.path / CONFIG_FILE]
        files += [self.path / f"{t}.parquet" for t in ("layers", "graph")]
        files += [p for t in TABLES for p in sorted((self.path / t).glob("part-*.parquet"))]
        out = []
        for f in files:
            try:
                st = f.stat()
            except OSError:
                continue
            out.append((f.relative_to(self.path).as_posix(), st.st_size, st.st_mtime_ns))
        return out

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
        # One multi-threaded scan of every part: twice as fast as a read per file. The schema
        # reads older parts as today's (whose matrices held list<float32> values).
        return pq.read_table([str(p) for p in parts], schema=SCHEMAS[table])
    except (pa.ArrowException, OSError, ValueError):
        pass  # some part is damaged or differs: read them one by one, skipping the bad ones
    tables = [t for _, t in _each_readable(parts, stacklevel=5, schema=SCHEMAS[table])]
    if not tables:
        return SCHEMAS[table].empty_table()
    return pa.concat_tables(tables, promote_options="permissive")


def _each_readable(
    parts: list[Path], stacklevel: int, schema: pa.Schema | None = None
) -> Iterator[tuple[Path, pa.Table]]:
    """Each part file that reads whole, with its table; each one that does not is skipped with a
    warning that names it."""
    for part in parts:
        try:
            yield part, pq.read_table(part, schema=schema)
        except (pa.ArrowException, OSError, ValueError) as exc:
            warnings.warn(
                f"skipping unreadable part file {part}: {first_line(exc)}", stacklevel=stacklevel
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
        warnings.warn(f"skipping unreadable file {path}: {first_line(exc)}", stacklevel=3)
        return plain(SCHEMAS[table].empty_table())


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
            warnings.warn(f"skipping run {p}: damaged {RUN_FILE} ({first_line(exc)})", stacklevel=2)
    return runs


def update_info(path: str | os.PathLike, **fields: Any) -> None:
    """Add `fields` to a finished run's run.json (atomically, as every write of it)."""
    run_file = Path(path) / RUN_FILE
    with open(run_file) as f:
        info = json.load(f)
    write_json(run_file, {**info, **fields})
