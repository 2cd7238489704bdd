"""RunWriter: one run directory's run.json and the part files appended to its tables; and the
cut of a resumed run's stored rows back to its checkpoint."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from netprobe import __version__
from netprobe.errors import ConfigError, StorageError, first_line
from netprobe.lifecycle import NO_ROOM
from netprobe.store.files import (
    RUN_FILE,
    atomic_write,
    manifest,
    next_part,
    now_iso,
    part_files,
    part_number,
    read_parts,
    remove_temp_files,
    write_json,
    write_part,
)
from netprobe.store.runs import run_seconds
from netprobe.store.schema import TABLES

if TYPE_CHECKING:
    from netprobe.lifecycle import RunLock

STATUSES = ("running", "completed", "failed", "diverged", "interrupted")


class RunWriter:
    """Owns one run directory: run.json's lifecycle and the numbered Parquet part files.

    It is given the directory's lock, held and checked (`lifecycle.claim_run_dir`): a new run's
    folder holds no run, a resumed one (`resume`) its own run. The writer releases the lock at
    `close`, or at once when it cannot start. Resuming from the end of epoch
    `info["epochs_done"] - 1` drops the stored rows of later epochs first.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        info: dict[str, Any],
        *,
        lock: RunLock,
        resume: bool = False,
    ) -> None:
        self.path = Path(path)
        if not (lock.held and lock.path.parent == self.path):
            raise ValueError(f"a writer of {self.path} needs that directory's lock, held")
        self.lock = lock
        self.closed = False
        try:
            before = read_info(self.path) if resume else {}
            end_parts = before.pop("end_parts", None)
            if resume and "epochs_done" in info:
                drop_rows_after(self.path, info["epochs_done"] - 1, end_parts)
            remove_temp_files(self.path)
            self._parts = {t: next_part(self.path / t) for t in TABLES}
            # Rows a failed write left in memory, per table, written first at the next try.
            self._unwritten: dict[str, pa.Table] = {}
            self.info = _start_info(before, info, resume)
            # Training time: what the run spent before it was resumed, then this process's.
            self._t0, self._earlier_s = time.monotonic(), run_seconds(before) or 0.0
            self._write_info()
        except BaseException:
            self.lock.release()
            raise

    def update(self, **fields: Any) -> None:
        self._check_open()  # before the fields: a closed run's info stays what it wrote
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
            self._check_open()
            self.info.update(status=status, error=error, ended_at=now_iso(), **fields)
            try:
                self._write_info()
            except StorageError as exc:
                # A full disk: the room the lock kept is given back for this last write.
                if exc.errno not in NO_ROOM or not self.lock.free_reserve():
                    raise
                self._write_info()
        finally:
            self.closed = True
            self.lock.release()

    def _write_info(self) -> None:
        self._check_open()
        self.info["duration_s"] = round(self._earlier_s + time.monotonic() - self._t0, 3)
        write_json(self.path / RUN_FILE, self.info)

    def write_table(self, name: str, table: pa.Table) -> None:
        """Write a whole single-file table (layers.parquet, graph.parquet)."""
        atomic_write(self.path / f"{name}.parquet", lambda tmp: pq.write_table(table, tmp))

    def append(self, name: str, table: pa.Table) -> Path | None:
        """Write `table` as the next part file of `name`; each part is complete on its own."""
        self._check_open()
        if table.num_rows == 0:
            return None
        folder = self.path / name
        part = folder / f"part-{self._parts[name]:06d}.parquet"
        try:
            folder.mkdir(exist_ok=True)
        except OSError as exc:
            raise StorageError(folder, exc) from None
        write_part(part, table)
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

    def remember(self, **fields: Any) -> None:
        """Fields for run.json's next write (a flush's, an epoch's end, the close)."""
        self._check_open()
        self.info.update(fields)

    def _check_open(self) -> None:
        """A closed run's files are final: its lock is released, another process may own it."""
        if self.closed:
            raise RuntimeError(f"the run in {self.path} is closed ({self.info['status']})")

    def mark_end_captures(self) -> None:
        """The parts written from now on hold the run's end captures (noted in run.json at
        close): a resumed run drops them and takes its own at its end."""
        self.info["end_parts"] = dict(self._parts)

    def rows_from(self, step: int) -> dict[str, pa.Table]:
        """The stored rows of every table at `step` and later. A resumed run's are the captures
        taken at the end of the epoch it resumes after: its later rows were dropped."""
        return {name: read_parts(part_files(self.path, name), name, step) for name in TABLES}

    def first_unwritten_step(self) -> int | None:
        """The first step of the rows still held in memory after a failed write, if any."""
        steps = [pc.min(t["step"]).as_py() for t in self._unwritten.values()]
        return min(steps) if steps else None


def _start_info(before: dict[str, Any], info: dict[str, Any], resume: bool) -> dict[str, Any]:
    """run.json as a run starts: a resumed run keeps what it said (when it started, ...) and
    notes when it went on; why it stopped early is its own run's to say (null until then)."""
    resumed = [*before.get("resumed_at", []), now_iso()] if resume else []
    return {
        **before,
        "netprobe_version": __version__,
        "status": "running",
        "started_at": before.get("started_at", now_iso()),
        "ended_at": None,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "error": None,
        "stop_reason": None,
        **({"resumed_at": resumed} if resumed else {}),
        **info,
    }


def read_info(path: str | os.PathLike) -> dict[str, Any]:
    """The run.json of the run at `path`; ConfigError (one line) when it is missing or damaged."""
    path = Path(path)
    if not (path / RUN_FILE).exists():
        raise ConfigError(f"no run in {path} to resume: it holds no {RUN_FILE}")
    try:
        return manifest(path)
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
        for part in part_files(path, name):
            try:
                rows = pq.read_metadata(part).num_rows  # a zero-byte part fails here
                if end is not None and part_number(part) >= end:
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
            write_part(part, kept)
    return sum(removed for _, removed, _ in cuts)


def update_info(path: str | os.PathLike, **fields: Any) -> None:
    """Add `fields` to a finished run's run.json (atomically, as every write of it)."""
    write_json(Path(path) / RUN_FILE, {**manifest(path), **fields})
