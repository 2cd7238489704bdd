"""`netprobe ls`: one table row per run."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

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


def list_runs(paths: Sequence[str | os.PathLike], console: Console | None = None) -> Table:
    """Print (and return) the table of every run under `paths`."""
    table = Table(title=None, show_lines=False)
    for col in ("status", "model", "data", "init", "seed", "epochs", "best val acc", "path"):
        table.add_column(
            col, justify="right" if col in ("seed", "epochs", "best val acc") else "left"
        )
    count = 0
    for path in paths:
        if not Path(path).exists():
            raise ConfigError(f"no such file or directory: {path}")
        for run_dir in find_runs(path):
            count += 1
            try:
                run = Run(run_dir)
            except (OSError, ValueError):
                table.add_row("[red]damaged[/]", "", "", "", "", "", "", str(run_dir))
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
                str(run_dir),
            )
    console = console or Console()
    if count == 0:
        raise ConfigError(f"no runs (directories with run.json) under {', '.join(map(str, paths))}")
    console.print(table)
    return table
