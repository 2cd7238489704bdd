"""What a person watching `netprobe train` sees: a rich bar on a terminal, plain lines elsewhere."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class TrainProgress:
    """Advances once per step; reads the loss only when the monitor has flushed (no extra syncs)."""

    def __init__(self, total: int, quiet: bool = False) -> None:
        self.console = Console(stderr=True)
        self.live = self.console.is_terminal and not quiet
        self.quiet = quiet
        self.total = total
        self._bar: Progress | None = None

    def __enter__(self) -> TrainProgress:
        if self.live:
            self._bar = Progress(
                TextColumn("[bold]train[/]"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task("train", total=self.total, status="")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.stop()

    def advance(self, mon: Any) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=1)

    def epoch_done(self, epoch: int, epochs: int, mon: Any) -> None:
        last = mon.latest()
        text = f"epoch {epoch + 1}/{epochs}  step {mon.progress.step}" + "".join(
            f"  {k} {last[k]:.4f}" for k in ("loss", "val_loss", "val_acc") if k in last
        )
        if self._bar is not None:
            self._bar.update(self._task, status=text)
        elif not self.quiet:
            print(text, file=sys.stderr, flush=True)
