"""TensorBoard event files from netprobe's tables: live (`trainer.tensorboard=true` writes RUN/tb/
at each flush) and after the fact (`netprobe export PATH --to tensorboard --out DIR`); tags are
`probe/metric/layer`, hparams the flattened config with the final results as `final/...`."""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa

from netprobe.errors import ConfigError, StorageError
from netprobe.query import read_config, varying_keys
from netprobe.store import Run, flatten, make_out_folder, read_runs_under, run_holding

TB_DIR = "tb"  # inside a run directory
FINAL = ("best_val_acc", "final.loss", "final.acc", "final.val_loss", "final.val_acc")


def _tensorboard() -> SimpleNamespace:
    """TensorBoard's protocol buffers and file writer, imported on first use (not with netprobe).
    Not torch's SummaryWriter: this needs no torch (export runs where torch would take seconds to
    import), takes the stored bin edges and counts as they are, and keeps hparams in the run's
    own event file (torch's add_hparams makes a new run)."""
    try:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter
    except ImportError:
        raise ConfigError("TensorBoard output needs tensorboard: pip install tensorboard") from None
    return SimpleNamespace(
        Event=event_pb2.Event,
        SessionLog=event_pb2.SessionLog,
        Summary=summary_pb2.Summary,
        HistogramProto=summary_pb2.HistogramProto,
        SummaryMetadata=summary_pb2.SummaryMetadata,
        api=api_pb2,
        plugin=plugin_data_pb2,
        RecordWriter=RecordWriter,
    )


def require() -> None:
    """Raise ConfigError (exit 2, one line) now if tensorboard is not installed."""
    _tensorboard()


def scalar_tag(probe: str, metric: str, layer: str) -> str:
    return f"{probe}/{metric}/{layer}" if layer else f"{probe}/{metric}"


def histogram_buckets(
    edges: Sequence[float], counts: Sequence[int], below: int, above: int
) -> tuple[float, list[float], list[int]]:
    """TensorBoard's buckets for stored edges and counts: the lowest edge, then each bucket's
    right edge and count. Counts outside the edges, when there are any, get a bucket one bin
    wide at that end, so none of the mass is lost."""
    edges = [float(e) for e in edges]
    lowest, limits, bucket = edges[0], edges[1:], [int(c) for c in counts]
    width = (edges[-1] - edges[0]) / max(len(counts), 1)
    if below:
        lowest, limits, bucket = edges[0] - width, [edges[0], *limits], [int(below), *bucket]
    if above:
        limits, bucket = [*limits, edges[-1] + width], [*bucket, int(above)]
    return lowest, limits, bucket


class EventWriter:
    """One TensorBoard run: `write(tables)` at each flush, `close(info)` at the end.

    Nothing is created on disk before the first write or close, so a run that is refused before
    it starts leaves no trace.
    """

    def __init__(self, logdir: str | os.PathLike, hparams: Mapping[str, Any] | None = None) -> None:
        self.tb = _tensorboard()
        self.logdir = Path(logdir)
        self.hparams = dict(hparams or {})
        self._file: Any = None

    def _open(self, start: float, step: int = 0) -> Any:
        if self._file is None:
            self._file = EventFile(self.tb, self.logdir)
            # Each process's events begin with a session start at its first step. TensorBoard's
            # server takes the first it reads as the run's start and each later one as a restart,
            # dropping every event read before at that step or later.
            begin = self.tb.SessionLog(status=self.tb.SessionLog.START)
            self._file.add_event(self.tb.Event(wall_time=start, step=step, session_log=begin))
            if self.hparams:
                self._hparams_start(start)
        return self._file

    # -- scalars and histograms
    def write(self, tables: Mapping[str, pa.Table], wall_time: Any = None) -> None:
        """Events for the scalars and histograms in `tables` (a flush's drained buffers, or a
        stored run's tables); `wall_time` is one time or a function of the step (default: now)."""
        now = time.time()
        when = wall_time if callable(wall_time) else (lambda step: wall_time or now)
        f = self._open(when(0))
        events: dict[int, list[Any]] = {}
        scalars = tables.get("scalars")
        if scalars is not None and scalars.num_rows:
            self._scalar_values(scalars, events)
        hists = tables.get("histograms")
        if hists is not None and hists.num_rows:
            self._histogram_values(hists, events)
        for step in sorted(events):
            summary = self.tb.Summary(value=events[step])
            f.add_event(self.tb.Event(wall_time=when(step), step=step, summary=summary))
        f.flush()

    def restart(
        self,
        step: int,
        rows_from: Callable[[int], Mapping[str, pa.Table]],
        complete_before: int | None = None,
    ) -> None:
        """A resumed run's first events, for its training from `step` on: its session starts
        where the earlier processes' events stop holding every stored row (`complete_before`,
        where known; else `step`, or 0 without an event file), so TensorBoard drops every event
        they wrote from there on; then the stored rows from there (`rows_from`) are written
        again: the captures of the epoch it resumes after, and the steps of a process that ran
        without events."""
        written = next(self.logdir.glob("events.out.tfevents.*"), None) is not None
        start = min(step, complete_before if complete_before is not None else step)
        start = start if written else 0
        now = time.time()
        self._open(now, start)
        self.write(rows_from(start), wall_time=now)

    def _scalar_values(self, table: pa.Table, events: dict[int, list[Any]]) -> None:
        value = self.tb.Summary.Value
        names = ("step", "probe", "metric", "layer", "value")
        for step, probe, metric, layer, v in zip(*(table.column(c).to_pylist() for c in names)):
            tag = scalar_tag(probe, metric, layer)
            events.setdefault(step, []).append(value(tag=tag, simple_value=v))

    def _histogram_values(self, table: pa.Table, events: dict[int, list[Any]]) -> None:
        names = ("step", "probe", "source", "layer", "edges", "counts", "below", "above")
        columns = [table.column(c).to_pylist() for c in names]
        for step, probe, source, layer, edges, counts, below, above in zip(*columns):
            lowest, limits, bucket = histogram_buckets(edges, counts, below, above)
            # TensorBoard reads bucket i as (limit[i-1], limit[i]], the first one from `min`.
            bounds = np.asarray([lowest, *limits])
            centers = (bounds[:-1] + bounds[1:]) / 2
            weights = np.asarray(bucket, np.float64)
            histo = self.tb.HistogramProto(
                min=lowest,
                max=limits[-1],
                num=float(weights.sum()),
                sum=float(centers @ weights),
                sum_squares=float(centers**2 @ weights),
                bucket_limit=limits,
                bucket=bucket,
            )
            tag = scalar_tag(probe, source, layer)
            events.setdefault(step, []).append(self.tb.Summary.Value(tag=tag, histo=histo))

    # -- hparams
    def _hparams_start(self, start: float) -> None:
        api, plugin = self.tb.api, self.tb.plugin
        hparams = {k: _hparam_value(v) for k, v in self.hparams.items()}
        hparams = {k: v for k, v in hparams.items() if v is not None}
        types = {bool: "DATA_TYPE_BOOL", float: "DATA_TYPE_FLOAT64", str: "DATA_TYPE_STRING"}
        experiment = api.Experiment(
            hparam_infos=[api.HParamInfo(name=k, type=types[type(v)]) for k, v in hparams.items()],
            metric_infos=[api.MetricInfo(name=api.MetricName(tag=_final_tag(k))) for k in FINAL],
        )
        session = plugin.SessionStartInfo(start_time_secs=start)
        for key, value in hparams.items():
            field = {bool: "bool_value", float: "number_value", str: "string_value"}[type(value)]
            setattr(session.hparams[key], field, value)
        self._plugin_event("_hparams_/experiment", experiment=experiment)
        self._plugin_event("_hparams_/session_start_info", session_start_info=session)

    def _plugin_event(self, tag: str, **data: Any) -> None:
        content = self.tb.plugin.HParamsPluginData(version=0, **data).SerializeToString()
        plugin_data = self.tb.SummaryMetadata.PluginData(plugin_name="hparams", content=content)
        value = self.tb.Summary.Value(
            tag=tag, metadata=self.tb.SummaryMetadata(plugin_data=plugin_data)
        )
        summary = self.tb.Summary(value=[value])
        self._file.add_event(self.tb.Event(wall_time=time.time(), summary=summary))

    def close(self, info: Mapping[str, Any] | None = None, wall_time: float | None = None) -> None:
        """Write the run's final results (`final/...` scalars, the hparams session's end) from
        its run.json `info`, flush and close the event file."""
        info = info or {}
        when = wall_time or time.time()
        f = self._open(when)
        final = flatten(info)
        values = [
            self.tb.Summary.Value(tag=_final_tag(k), simple_value=final[k])
            for k in FINAL
            if isinstance(final.get(k), (int, float)) and not isinstance(final.get(k), bool)
        ]
        if values:
            step = int(info.get("steps_done") or 0)
            summary = self.tb.Summary(value=values)
            f.add_event(self.tb.Event(wall_time=when, step=step, summary=summary))
        status = {
            "completed": "STATUS_SUCCESS",
            "failed": "STATUS_FAILURE",
            "diverged": "STATUS_FAILURE",
            "running": "STATUS_RUNNING",
        }.get(str(info.get("status")))
        # TensorBoard's server keeps the first session end it reads of a run: an interrupted
        # process writes none, so that the end of the process that resumes it is the one shown.
        if self.hparams and status is not None:
            end = self.tb.plugin.SessionEndInfo(status=status, end_time_secs=when)
            self._plugin_event("_hparams_/session_end_info", session_end_info=end)
        f.flush()
        f.close()
        self._file = None


_FILE_NUMBER = itertools.count()  # of the event files this process opens, for unique names


class EventFile:
    """One event file, written in the caller's thread at netprobe's flushes only: a write that
    fails (a full disk) raises StorageError where it happens, naming the file. (TensorBoard's
    own writer writes from a thread of its own, whose failure prints a traceback there and is
    raised again at a later, unrelated call.)"""

    def __init__(self, tb: SimpleNamespace, logdir: Path) -> None:
        host, number = socket.gethostname(), next(_FILE_NUMBER)
        self.path = (
            logdir / f"events.out.tfevents.{int(time.time()):010d}.{host}.{os.getpid()}.{number}"
        )
        with self._writing():
            logdir.mkdir(parents=True, exist_ok=True)
            self._records = tb.RecordWriter(open(self.path, "wb"))  # closed by close()
        self.add_event(tb.Event(wall_time=time.time(), file_version="brain.Event:2"))
        self.flush()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise StorageError(self.path, exc) from None

    def add_event(self, event: Any) -> None:
        with self._writing():
            self._records.write(event.SerializeToString())

    def flush(self) -> None:
        with self._writing():
            self._records.flush()

    def close(self) -> None:
        with self._writing():
            self._records.close()


def _final_tag(key: str) -> str:
    """`final.val_acc` (run.json's `final` field) → `final/val_acc`; `best_val_acc` likewise."""
    return f"final/{key.split('.')[-1]}"


def _hparam_value(value: Any) -> bool | float | str | None:
    """A config value as TensorBoard's hparams hold it: a bool, a number or a string."""
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str)


# ---------------------------------------------------------------- export of stored runs


def _timestamp(text: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(text)).timestamp()
    except ValueError:
        return None


def run_names(run_dirs: Sequence[Path], root: Path) -> dict[Path, str]:
    """TensorBoard run names: a sweep's jobs (runs sharing a folder) by what differs between
    them, their command-line overrides (`sweep/init=orthogonal,seed=1`) or else their config
    keys; other runs by their path."""
    from netprobe.listing import swept_overrides

    root = root.resolve()

    def relative(path: Path) -> str:
        rel = path.resolve().relative_to(root)
        return rel.as_posix() if str(rel) != "." else path.resolve().name

    groups: dict[Path, list[Path]] = {}
    for run_dir in run_dirs:
        groups.setdefault(run_dir.resolve().parent, []).append(run_dir)
    names: dict[Path, str] = {}
    for parent, members in groups.items():
        if len(members) == 1:
            names[members[0]] = relative(members[0])
            continue
        labels = {d: ",".join(o.split()) for d, o in swept_overrides(members).items()}
        if not all(labels.values()):
            configs = {d: read_config(Run(d)) for d in members}
            keys = varying_keys(list(configs.values()))
            labels = {d: ",".join(f"{k}={configs[d].get(k)}" for k in keys) for d in members}
        for d, label in labels.items():
            names[d] = f"{relative(parent)}/{label}" if label and parent != root else label
    # Jobs no config key tells apart keep their own folder's name as well.
    seen: dict[str, int] = {}
    for name in names.values():
        seen[name] = seen.get(name, 0) + 1
    return {
        d: relative(d) if not name or seen[name] > 1 else name.replace(os.sep, "/")
        for d, name in names.items()
    }


def export(paths: Sequence[str | os.PathLike], out: str | os.PathLike) -> list[Path]:
    """Event files for every stored run under `paths`, one TensorBoard run per run in `out`;
    refuses (ConfigError, nothing written) an `out` that `check_out` does not accept."""
    require()
    out = Path(out)
    runs = {r.path: r for r in read_runs_under(paths)}
    # Named from the folder all PATHs share, so that runs given one by one get their sweep's names.
    root = Path(os.path.commonpath([Path(p).resolve() for p in paths]))
    names = run_names(list(runs), root)
    targets = {path: out / name for path, name in names.items()}
    check_out(out)
    make_out_folder(out)
    written = []
    for run in runs.values():
        wall_time = _wall_times(run.info)
        writer = EventWriter(targets[run.path], hparams=read_config(run))
        writer.write({t: run.table(t) for t in ("scalars", "histograms")}, wall_time=wall_time)
        writer.close(run.info, wall_time=wall_time(int(run.info.get("steps_done") or 0)))
        written.append(targets[run.path])
    return written


def check_out(out: Path) -> None:
    """Refuse (ConfigError) an --out inside a run directory, where a run's own files are, or one
    that already holds event files, which TensorBoard would show beside the new ones."""
    run = run_holding(out)
    if run is not None:
        raise ConfigError(
            f"--out {out} is inside the run directory {run}, which export never writes into; "
            "give an --out outside every run"
        )
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the event files")
    if out.is_dir() and next(out.rglob("events.out.tfevents.*"), None) is not None:
        raise ConfigError(
            f"--out {out} already holds TensorBoard event files (an earlier export?); "
            "give another --out, or remove that folder first"
        )


def _wall_times(info: Mapping[str, Any]) -> Any:
    """A stored run's wall time at each step: only its start and end are known, so the steps
    are placed evenly between them."""
    start = _timestamp(info.get("started_at")) or time.time()
    end = _timestamp(info.get("ended_at")) or start
    last = max(int(info.get("steps_done") or 0), 1)
    return lambda step: start + max(end - start, 0.0) * min(step / last, 1.0)
