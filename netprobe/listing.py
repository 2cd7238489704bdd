"""`netprobe ls`: one row per run, the jobs of each sweep together with their mean ± std; sorted,
filtered, and as a table, CSV or JSON. A column is a name and a function of the run (COLUMNS)."""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from netprobe.errors import ConfigError
from netprobe.lifecycle import effective_status
from netprobe.progress import plural
from netprobe.store import (
    RUN_FILE,
    Run,
    flatten,
    json_text,
    manifest,
    run_seconds,
    runs_under,
)

STATUS_STYLE = {
    "completed": "green",
    "running": "cyan",
    "failed": "red",
    "diverged": "magenta",
    "interrupted": "yellow",
    "damaged": "red",
    "crashed": "red",
    "refused": "red",
}
# Hydra writes multirun.yaml into a sweep's directory; its jobs' run directories lie beneath.
SWEEP_FILE = "multirun.yaml"
FORMATS = ("table", "csv", "json")
# The final metrics a sweep's mean ± std is taken of.
AGGREGATED = ("best_val_acc", "val_acc", "loss")


class Row:
    """One run as `ls` sees it: run.json, the flattened config (read when asked for), its sweep."""

    def __init__(self, path: Path, sweep: Path | None = None, swept: str = "") -> None:
        self.path, self.sweep, self.swept = path, sweep, swept
        self.said = ""  # what a command said of the run, shown as its reason (sweep_summary)
        try:
            self.info: dict[str, Any] = manifest(path)
            self.status = effective_status(self.info)
        except (OSError, ValueError):
            self.info, self.status = {}, "damaged"

    @cached_property
    def config(self) -> dict[str, Any]:
        """The composed config, flattened to dotted keys (`optim.lr`), interpolations resolved."""
        path = self.path / ".hydra" / "config.yaml"
        if not path.exists():
            return {}
        from omegaconf import OmegaConf

        try:
            cfg = OmegaConf.load(path)
        except Exception:  # noqa: BLE001 - a damaged config: the run is listed without one
            return {}
        try:
            tree = OmegaConf.to_container(cfg, resolve=True)
        except Exception:  # noqa: BLE001 - a resolver only Hydra knows: keep them as written
            tree = OmegaConf.to_container(cfg, resolve=False)
        return flatten(tree)

    def value(self, key: str) -> Any:
        """A column's value, else the config's or run.json's value at `key`."""
        if key in COLUMNS:
            return COLUMNS[key](self)
        if key in self.config:
            return self.config[key]
        return self.info.get(key)

    @property
    def shown_path(self) -> str:
        return str(self.path.resolve().relative_to(self.sweep) if self.sweep else self.path)


def _final(metric: str) -> Callable[[Row], Any]:
    return lambda row: (row.info.get("final") or {}).get(metric)


def _why(row: Row) -> str:
    """Why a run ended as it did, in full: the error of an unsuccessful one, an early stop's
    reason; or what the command that closes a sweep said of it."""
    if row.said:
        return row.said
    if row.status == "crashed":
        return "its process is gone without closing the run" + _last_recorded(row)
    if row.status == "damaged":
        return f"unreadable {RUN_FILE}"
    text = row.info.get("error") if row.status != "completed" else None
    return str(text or row.info.get("stop_reason") or "")


def _reason(row: Row) -> str:
    """`_why`, cut to a table cell; a crashed run's whole, as it ends in its last accuracy."""
    text = _why(row)
    return text if len(text) <= 60 or row.status == "crashed" else text[:59] + "…"


def _last_recorded(row: Row) -> str:
    """What a run that never closed recorded last, for its reason: its `final` columns stay
    empty, as run.json's `final` is, and out of the sweep's mean."""
    try:
        results = Run(row.path).results()
    except (OSError, ValueError):
        return ""
    if "val_acc" not in results.values:
        return ""
    return f"; last val_acc {results.values['val_acc']:.4f} (epoch {results.epochs})"


def _health(row: Row) -> str:
    """The doctor's verdict: the findings run.json keeps, or a fresh diagnosis of a live run."""
    if row.status == "damaged":
        return ""
    from netprobe.doctor import health

    return health(row.path)


def _started(row: Row) -> str:
    try:
        return datetime.fromisoformat(row.info["started_at"]).strftime("%Y-%m-%d %H:%M")
    except (KeyError, TypeError, ValueError):
        return ""


# Every column: its name (for --columns, --sort, --filter) and the function giving its value.
COLUMNS: dict[str, Callable[[Row], Any]] = {
    "status": lambda row: row.status,
    "reason": _reason,
    "model": lambda row: row.info.get("model"),
    "data": lambda row: row.info.get("data"),
    "init": lambda row: row.info.get("init"),
    "seed": lambda row: row.info.get("seed"),
    "steps": lambda row: row.info.get("steps_done"),
    "epochs": lambda row: row.info.get("epochs_done"),
    "duration": lambda row: run_seconds(row.info),
    "loss": _final("loss"),
    "best_val_acc": lambda row: row.info.get("best_val_acc"),
    "val_acc": _final("val_acc"),
    "probes": lambda row: row.info.get("probes"),
    "health": _health,
    "started": _started,
    "path": lambda row: row.shown_path,
}
RIGHT = {"seed", "steps", "epochs", "duration", "loss", "best_val_acc", "val_acc"}
SWEEP_COLUMNS = ("status", "reason", "epochs", "duration", "loss", "best_val_acc", "val_acc")


def show(key: str, value: Any) -> str:
    """A value as a table cell."""
    if value is None:
        return ""
    if key == "duration":
        from netprobe.progress import duration

        return duration(value)
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


# ------------------------------------------------------------------------- finding the runs


def sweep_of(run_dir: Path) -> Path | None:
    """The sweep a run belongs to: the nearest directory above it holding multirun.yaml."""
    for parent in list(run_dir.resolve().parents)[:4]:
        if (parent / SWEEP_FILE).exists():
            return parent
    return None


def overrides_of(run_dir: Path) -> dict[str, str]:
    """The job's command-line overrides (Hydra's .hydra/overrides.yaml) as key → value."""
    try:
        with open(run_dir / ".hydra" / "overrides.yaml") as f:
            items = [str(o) for o in yaml.safe_load(f) or []]
    except (OSError, yaml.YAMLError):
        items = []
    return dict(o.split("=", 1) if "=" in o else (o, "") for o in items)


def swept_overrides(run_dirs: list[Path]) -> dict[Path, str]:
    """Each job's command-line overrides that differ between the jobs of its sweep (a key a job
    was not given is left out of its line, not shown as `key=`). Bookkeeping keys never define a
    job (config.BOOKKEEPING): a sweep sent again with `trainer.resume=true` gives it to the jobs
    it resumes or starts, not to those it leaves as they were."""
    from netprobe.config import bookkeeping

    jobs = {
        d: {k: v for k, v in overrides_of(d).items() if not bookkeeping(k.lstrip("+~"))}
        for d in run_dirs
    }
    keys = sorted({k for job in jobs.values() for k in job})
    varying = [k for k in keys if len({job.get(k) for job in jobs.values()}) > 1]
    return {d: " ".join(f"{k}={job[k]}" for k in varying if k in job) for d, job in jobs.items()}


def runs_by_sweep(paths: Iterable[str | os.PathLike]) -> dict[Path | None, dict[Path, str]]:
    """The run folders under `paths`, grouped by sweep (None: runs of no sweep), sweeps first,
    each with its swept overrides ("" outside a sweep); one line and exit 2 when there are none."""
    run_dirs = runs_under(paths)
    by_sweep: dict[Path | None, list[Path]] = {}
    for run_dir in run_dirs:
        by_sweep.setdefault(sweep_of(run_dir), []).append(run_dir)
    groups: dict[Path | None, dict[Path, str]] = {}
    for sweep in sorted(by_sweep, key=lambda s: (s is None, str(s))):
        members = by_sweep[sweep]
        swept = swept_overrides(members) if sweep is not None else {}
        groups[sweep] = {d: swept.get(d, "") for d in members}
    return groups


def collect(paths: Sequence[str | os.PathLike]) -> dict[Path | None, list[Row]]:
    """The runs under `paths` as table rows, grouped by sweep (None: runs of no sweep)."""
    return {
        sweep: [Row(d, sweep, swept) for d, swept in members.items()]
        for sweep, members in runs_by_sweep(paths).items()
    }


# ------------------------------------------------------------------------- choosing and ordering


def _check_keys(keys: Sequence[str], rows: list[Row], what: str) -> None:
    """Every key must be a column, or a config or run.json key of some run (configs are read
    only when a key asks for them: plain `ls` reads run.json alone)."""
    unknown = [k for k in keys if k not in COLUMNS and k != "swept"]
    known = {k for row in rows for k in (*row.config, *row.info)} if unknown else set()
    for key in unknown:
        if key not in known:
            raise ConfigError(
                f"{what} {key!r} is neither a column ({', '.join(COLUMNS)}) nor a config or "
                "run.json key of these runs (e.g. optim.lr, trainer.epochs)"
            )


def _matches(value: Any, wanted: str) -> bool:
    """Whether a value equals any of the comma-separated `wanted` (numbers as numbers); a list
    (the probes) matches when any of its items does."""
    if isinstance(value, list):
        return any(_matches(item, wanted) for item in value)
    for option in wanted.split(","):
        if str(value) == option or show("", value) == option:
            return True
        if isinstance(value, bool) or value is None:
            if str(value).lower() == option.lower():
                return True
            continue
        try:
            if float(value) == float(option):
                return True
        except (TypeError, ValueError):
            pass
    return False


def parse_filters(filters: Sequence[str]) -> list[tuple[str, str]]:
    """["status=failed", ...] → [("status", "failed"), ...]; refuses an item without `=`."""
    pairs = []
    for item in filters:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--filter {item!r} must be KEY=VALUE (e.g. status=completed)")
        pairs.append((key, value))
    return pairs


def select(
    groups: dict[Path | None, list[Row]],
    filters: Sequence[str] = (),
    sort: str | None = None,
) -> dict[Path | None, list[Row]]:
    """Only the runs every filter matches, sorted by `sort` (`-KEY`: descending) in each group."""
    rows = [row for members in groups.values() for row in members]
    pairs = parse_filters(filters)
    _check_keys([k for k, _ in pairs], rows, "--filter key")
    descending = bool(sort and sort.startswith("-"))
    key = sort.lstrip("-") if sort else None
    if key is not None:
        _check_keys([key], rows, "--sort key")
    chosen: dict[Path | None, list[Row]] = {}
    for sweep, members in groups.items():
        kept = [r for r in members if all(_matches(_get(r, k), v) for k, v in pairs)]
        if key is not None:
            kept = _sorted(kept, key, descending)
        if kept:
            chosen[sweep] = kept
    return chosen


def _get(row: Row, key: str) -> Any:
    return row.swept if key == "swept" else row.value(key)


def _sorted(rows: list[Row], key: str, descending: bool) -> list[Row]:
    """Numbers by value, the rest as text; runs without the key last either way."""
    have = [r for r in rows if _get(r, key) not in (None, "")]
    missing = [r for r in rows if _get(r, key) in (None, "")]

    def order(row: Row) -> tuple[int, float, str]:
        value = _get(row, key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return (0, float(value), "")
        return (1, 0.0, str(value))

    return sorted(have, key=order, reverse=descending) + missing


def seed_groups(rows: list[Row]) -> list[tuple[str, list[Row]]]:
    """A sweep's runs grouped by what the sweep varied apart from the seed."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        rest = " ".join(p for p in row.swept.split() if not p.startswith("seed="))
        groups.setdefault(rest, []).append(row)
    return list(groups.items())


def mean_std_lines(rows: list[Row]) -> list[str]:
    """mean ± std (sample std) of the final metrics, per group of runs differing only by seed."""
    lines = []
    for label, members in seed_groups(rows):
        if len(members) < 2:
            continue
        parts = []
        for key in AGGREGATED:
            values = [v for r in members if isinstance(v := r.value(key), (int, float))]
            if len(values) >= 2:
                mean, std = statistics.mean(values), statistics.stdev(values)
                parts.append(f"{key} {mean:.4f} ± {std:.4f}")
        if parts:
            where = f" with {label}" if label else ""
            lines.append(f"mean ± std over {len(members)} runs{where}: " + ", ".join(parts))
    return lines


# ------------------------------------------------------------------------- writing


def list_runs(
    paths: Sequence[str | os.PathLike],
    *,
    sort: str | None = None,
    filters: Sequence[str] = (),
    columns: Sequence[str] | None = None,
    fmt: str = "table",
    out: Any = None,
) -> int:
    """Write the runs under `paths` to `out` (stdout) as `fmt`; returns how many were listed."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not valid; valid formats: {', '.join(FORMATS)}")
    groups = collect(paths)
    rows = [row for members in groups.values() for row in members]
    if columns is not None:
        _check_keys(columns, rows, "column")
    groups = select(groups, filters, sort)
    out = out or sys.stdout
    chosen = [row for members in groups.values() for row in members]
    if fmt == "json":
        out.write(json_text([_as_json(row) for row in chosen], indent=1) + "\n")
    elif fmt == "csv":
        # Exactly the columns asked for; by default every column and where the run lies.
        keys = list(columns) if columns is not None else [*COLUMNS, "sweep", "swept"]
        writer = csv.writer(out)
        writer.writerow(keys)
        for row in chosen:
            writer.writerow([_csv_cell(row, key) for key in keys])
    elif chosen:
        _print_tables(groups, columns, out)
    else:
        print(f"netprobe: no run matches {' '.join(filters)}", file=sys.stderr)
    return len(chosen)


def _csv_cell(row: Row, key: str) -> Any:
    """A CSV row stands alone, outside its sweep's table: the whole path, and the sweep's."""
    if key == "path":
        return str(row.path)
    if key == "sweep":
        return str(row.sweep or "")
    value = _get(row, key)
    return "" if value is None else show(key, value) if isinstance(value, list) else value


def _as_json(row: Row) -> dict[str, Any]:
    """The whole run.json, the flattened config, where the run lies, and the table's reason in
    full (null where there is none)."""
    return {
        "path": str(row.path),
        "status": row.status,
        "reason": _why(row) or None,
        "sweep": str(row.sweep) if row.sweep else None,
        "swept": row.swept,
        "info": row.info,
        "config": row.config,
    }


def _print_tables(
    groups: dict[Path | None, list[Row]], columns: Sequence[str] | None, out: Any
) -> None:
    from rich.console import Console

    tty = out.isatty() if hasattr(out, "isatty") else False
    # Piped or redirected, rich would assume 80 columns and cut model names and paths short.
    console = Console(file=out, width=None if tty else 200, highlight=False)
    for sweep, rows in groups.items():
        if sweep is None:
            title = "single runs" if len(groups) > 1 else None
        else:
            title = f"sweep {sweep} ({len(rows)} runs)"
        if title:  # above the table, not its title: a narrow table would wrap a long path
            console.print(title, markup=False, soft_wrap=True)
        console.print(table(rows, columns))
        if sweep is not None:
            for line in mean_std_lines(rows):
                console.print("  " + line, markup=False)


def table(rows: list[Row], columns: Sequence[str] | None = None) -> Any:
    """A rich table of `rows`: `columns` (all by default), and what a sweep varied."""
    from rich.markup import escape
    from rich.table import Table

    keys = list(columns or COLUMNS)
    in_sweep = any(row.sweep for row in rows)
    if in_sweep and "swept" not in keys and columns is None:
        keys.insert(keys.index("path") if "path" in keys else len(keys), "swept")
    tab = Table()
    for key in keys:
        # Statuses whole, never "compl…": they are what a reader scans the table for.
        tab.add_column(
            key,
            justify="right" if key in RIGHT else "left",
            no_wrap=key == "status",
            overflow="fold",
        )
    for row in rows:
        # Text, not markup: a path, an error or a refusal may hold brackets (`probes=[a,b]`).
        cells = [escape(show(key, _get(row, key))) for key in keys]
        if "status" in keys:
            i = keys.index("status")
            cells[i] = f"[{STATUS_STYLE.get(row.status, 'white')}]{cells[i]}[/]"
        tab.add_row(*cells)
    return tab


def sweep_summary(
    sweep: str | os.PathLike,
    ended: Mapping[Path, tuple[str, str]] | None = None,
    out: Any = None,
) -> None:
    """What closes `netprobe train -m`: the jobs' table, mean ± std over seeds, and the command
    that plots the sweep.

    `ended`: how each job this process ran ended (its run folder → its status, or `refused` or
    `unchanged`, and the line it said). Given, the table and its count are of those jobs alone,
    not of other runs in the folder: a refused job's row says `refused` and why, one stopped
    before it started `interrupted` and that (whatever run its folder holds is another command's);
    a job with nothing to resume shows its run, untouched.
    Jobs run in a launcher's workers are not known here: then every run in the folder is shown."""
    from rich.console import Console

    out = out or sys.stderr
    try:
        rows = [row for members in collect([sweep]).values() for row in members]
    except ConfigError:  # no run in the folder: every job was refused before it made one
        rows = []
    outcomes = {row.path.resolve(): row.status for row in rows}
    if ended:
        found = {row.path.resolve(): row for row in rows}
        home = Path(sweep).resolve()
        rows = [found.get(Path(p).resolve()) or Row(Path(p), home) for p in ended]
        for row, (status, said) in zip(rows, ended.values()):
            outcomes[row.path.resolve()] = status
            if status == "unchanged":
                row.said = "nothing to resume: left as it was"
            elif said:  # refused, or stopped before it started: the folder holds no run of its
                row.info, row.status, row.said = {}, status, said
    tally = Counter(outcomes[row.path.resolve()] for row in rows)
    counts = [f"{tally.pop('completed', 0)} completed"]
    counts += [f"{n} {OUTCOMES.get(status, status)}" for status, n in tally.items()]
    console = Console(file=out, width=None if out.isatty() else 200, highlight=False)
    jobs = plural(len(rows), "job")
    console.print(f"sweep {Path(sweep)}: {jobs}, {', '.join(counts)}", markup=False, soft_wrap=True)
    console.print(table(rows, ["path", *SWEEP_COLUMNS, "swept"]))
    for line in mean_std_lines(rows):
        console.print("  " + line, markup=False)
    console.print(f"next: netprobe plot {sweep}", markup=False)


# How the sweep's closing count names what its command did to a job, besides its run's status.
OUTCOMES = {"unchanged": "left as they were (nothing to resume)"}
