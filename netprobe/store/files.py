"""Files written whole or not at all (fsynced, renamed into place), and the numbered Parquet part
files a run's tables consist of."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import numbers
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from netprobe.errors import ConfigError, StorageError, first_line
from netprobe.lifecycle import RUN_FILE, signals_held
from netprobe.store.schema import SCHEMAS

CONFIG_FILE = ".hydra/config.yaml"  # the composed config, as Hydra writes it


def now_iso() -> str:
    """Now, in UTC, to the second, as run.json holds times."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Write `path` whole or not at all (SPEC §3): `write(tmp)` fills a temporary name beside it,
    which is fsynced and renamed into place, and the directory fsynced, so that neither a crash
    nor a power loss leaves a half-written or empty file. A failure leaves no temporary file
    behind and raises StorageError naming `path`. A stop signal waits until the file is whole
    (a checkpoint cut short is lost, and torch.save hides the interrupt behind an error)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with signals_held():
        try:
            write(tmp)
            _fsync(tmp)
            os.replace(tmp, path)
            _fsync(path.parent)
        except StorageError:
            raise
        except Exception as exc:
            cause = _os_error(exc)
            if cause is None:
                raise
            raise StorageError(path, cause) from exc
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)


def _os_error(exc: BaseException | None) -> OSError | None:
    """The OSError behind `exc`, itself or one it was raised while handling: torch.save, its
    disk full, raises a RuntimeError of its own while closing the file, and the ENOSPC is that
    one's context."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


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


def json_text(data: Any, indent: int | None = 2) -> str:
    """`data` as JSON any parser reads: a non-finite number (NaN, ±inf) is written as null, as
    `netprobe query` writes it."""
    return json.dumps(_finite(data), indent=indent, default=str, allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, numbers.Real) and not math.isfinite(value):
        return None
    return value


def make_out_folder(path: Path) -> None:
    """Create the folder a command writes its output into (`--out`), once every other check has
    passed; ConfigError (one line) when it cannot be created or written into."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        writable = os.access(path, os.W_OK)
    except OSError as exc:
        reason = exc.strerror or first_line(exc)
        raise ConfigError(
            f"--out {path}: cannot create the folder ({reason}); give another --out"
        ) from None
    if not writable:
        raise ConfigError(f"--out {path}: the folder is not writable; give another --out")


def write_json(path: Path, data: Any) -> None:
    """A JSON file (run.json, a plot's manifest and groups.json) written atomically, a NaN or
    ±inf as null."""
    atomic_write(path, lambda tmp: tmp.write_text(json_text(data)))


def write_text(path: Path, text: str) -> None:
    """A text file (an exported query result) written atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_parquet(path: Path, table: pa.Table) -> None:
    """A Parquet file outside any run (an exported query result) written atomically."""
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The run.json of the run at `path`; OSError or ValueError when it is missing or damaged."""
    with open(Path(path) / RUN_FILE) as f:
        info = json.load(f)
    if not isinstance(info, dict):
        raise ValueError(f"{Path(path) / RUN_FILE} holds {type(info).__name__}, not an object")
    return info


def part_files(run_dir: str | os.PathLike, table: str) -> list[Path]:
    """The part files of one of a run's tables (`scalars`, `histograms`, `matrices`), in order."""
    folder = Path(run_dir) / table
    return sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []


def next_part(folder: Path) -> int:
    """The number the next part file in `folder` takes."""
    parts = sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []
    return part_number(parts[-1]) + 1 if parts else 0


def part_number(part: Path) -> int:
    return int(part.stem.split("-")[1])


def write_part(part: Path, table: pa.Table) -> None:
    """One part file of a run's table, written atomically."""
    atomic_write(part, lambda tmp: pq.write_table(table, tmp, **_write_options(table)))


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


def remove_temp_files(path: Path) -> None:
    """The temporary files of writes that a killed process never finished (only the directory's
    lock holder may call this: another writer's files would be in use)."""
    for tmp in [*path.glob(".*.tmp-*"), *path.glob("*/.*.tmp-*")]:
        with contextlib.suppress(OSError):
            tmp.unlink()


def read_parts(parts: list[Path], table: str, from_step: int | None = None) -> pa.Table:
    """The rows of every part that reads, as one table of `table`'s schema; with `from_step`,
    only those at that step or later (parts wholly before it are skipped by their statistics)."""
    if not parts:
        return SCHEMAS[table].empty_table()
    filters = None if from_step is None else [("step", ">=", from_step)]
    try:
        # One multi-threaded scan of every part: twice as fast as a read per file. The schema
        # reads older parts as today's (whose matrices held list<float32> values).
        return pq.read_table([str(p) for p in parts], schema=SCHEMAS[table], filters=filters)
    except (pa.ArrowException, OSError, ValueError):
        pass  # some part is damaged or differs: read them one by one, skipping the bad ones
    tables = [t for _, t in _each_readable(parts, stacklevel=5, schema=SCHEMAS[table])]
    if not tables:
        return SCHEMAS[table].empty_table()
    rows = pa.concat_tables(tables, promote_options="permissive")
    return rows if from_step is None else rows.filter(pc.greater_equal(rows["step"], from_step))


def damaged_part(run_dir: Path, tables: Iterable[str]) -> tuple[Path, str] | None:
    """The first part file of these tables whose footer does not read (emptied or cut short),
    and why; None when every one reads."""
    for table in tables:
        for part in part_files(run_dir, table):
            try:
                pq.read_metadata(part)
            except (pa.ArrowException, OSError, ValueError) as exc:
                return part, first_line(exc)
    return None


def readable_parts(parts: list[Path]) -> list[Path]:
    """The part files that read whole; the others are skipped with the warning `load` gives."""
    return [part for part, _ in _each_readable(parts, stacklevel=4)]


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


def read_file(path: Path, table: str) -> pa.Table:
    """A single-file table (layers, graph): empty when missing, and with a warning when damaged."""
    if not path.exists():
        return SCHEMAS[table].empty_table()
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        warnings.warn(f"skipping unreadable file {path}: {first_line(exc)}", stacklevel=3)
        return SCHEMAS[table].empty_table()
