"""`netprobe ls`: one table row per run, the jobs of each sweep together."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from netprobe.doctor import health
from netprobe.errors import ConfigError
from netprobe.store import Run, find_runs

STATUS_STYLE = {
    "completed": "green",
    "running": "cyan",
    "failed": "red",
    "diverged": "magenta",
    "interrupted": "yellow",
    "damaged": "red",
    "crashed": "red",
}


COLUMNS = ("status", "model", "data", "init", "seed", "epochs", "best val acc", "health")
# Hydra writes multirun.yaml into a sweep's directory; its jobs' run directories lie beneath.
SWEEP_FILE = "multirun.yaml"


def sweep_of(run_dir: Path) -> Path | None:
    """The sweep a run belongs to: the nearest directory above it holding multirun.yaml."""
    for parent in list(run_dir.resolve().parents)[:4]:
        if (parent / SWEEP_FILE).exists():
            return parent
    return None


def swept_overrides(run_dirs: list[Path]) -> dict[Path, str]:
    """Each job's command-line overrides that differ between the jobs of its sweep."""
    jobs = {}
    for run_dir in run_dirs:
        try:
            with open(run_dir / ".hydra" / "overrides.yaml") as f:
                items = [str(o) for o in yaml.safe_load(f) or []]
        except (OSError, yaml.YAMLError):
            items = []
        jobs[run_dir] = dict(o.split("=", 1) if "=" in o else (o, "") for o in items)
    keys = sorted({k for job in jobs.values() for k in job})
    varying = [k for k in keys if len({job.get(k) for job in jobs.values()}) > 1]
    return {d: " ".join(f"{k}={job.get(k, '')}" for k in varying) for d, job in jobs.items()}


def list_runs(paths: Sequence[str | os.PathLike], console: Console | None = None) -> list[Table]:
    """Print (and return) the runs under `paths`: one table per sweep, then the single runs."""
    run_dirs: list[Path] = []
    for path in paths:
        if not Path(path).exists():
            raise ConfigError(f"no such file or directory: {path}")
        run_dirs.extend(d for d in find_runs(path) if d not in run_dirs)
    if not run_dirs:
        raise ConfigError(f"no runs (directories with run.json) under {', '.join(map(str, paths))}")
    sweeps: dict[Path | None, list[Path]] = {}
    for run_dir in run_dirs:
        sweeps.setdefault(sweep_of(run_dir), []).append(run_dir)
    tables = []
    for sweep, members in sorted(sweeps.items(), key=lambda kv: (kv[0] is None, str(kv[0]))):
        if sweep is None:
            title = "single runs" if len(sweeps) > 1 else None
            tables.append(_table(members, title, {}))
        else:
            jobs = swept_overrides(members)
            tables.append(_table(members, f"sweep {sweep} ({len(members)} runs)", jobs, sweep))
    # Piped or redirected, rich would assume 80 columns and cut model names and paths short.
    console = console or Console(width=None if sys.stdout.isatty() else 200)
    for table in tables:
        console.print(table)
    return tables


def _table(
    run_dirs: list[Path], title: str | None, jobs: dict[Path, str], sweep: Path | None = None
) -> Table:
    """One table; inside a sweep, paths are relative to the sweep directory in the title."""
    table = Table(title=title, title_justify="left", show_lines=False)
    right = ("seed", "epochs", "best val acc")
    for col in COLUMNS:
        # Statuses whole, never "compl…": they are what a reader scans the table for.
        table.add_column(col, justify="right" if col in right else "left", no_wrap=col == "status")
    if jobs:
        table.add_column("swept", overflow="fold")
    table.add_column("path", overflow="fold")
    for run_dir in run_dirs:
        extra = [jobs.get(run_dir, "")] if jobs else []
        shown = run_dir.resolve().relative_to(sweep) if sweep is not None else run_dir
        try:
            run = Run(run_dir)
        except (OSError, ValueError):
            table.add_row("[red]damaged[/]", "", "", "", "", "", "", "", *extra, str(shown))
            continue
        info, status = run.info, run.status
        acc = info.get("best_val_acc")
        table.add_row(
            f"[{STATUS_STYLE.get(status, 'white')}]{status}[/]",
            str(info.get("model", "")),
            str(info.get("data", "")),
            str(info.get("init", "")),
            str(info.get("seed", "")),
            str(info.get("epochs_done", "")),
            f"{acc:.4f}" if isinstance(acc, (int, float)) else "",
            health(run),
            *extra,
            str(shown),
        )
    return table
