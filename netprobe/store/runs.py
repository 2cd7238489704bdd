"""Finding runs beneath a folder, opening them, and their run.json read as it is."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from netprobe.errors import ConfigError, first_line
from netprobe.store.files import RUN_FILE
from netprobe.store.reader import Run
from netprobe.store.schema import TABLES


def run_seconds(info: Mapping[str, Any]) -> float | None:
    """The seconds a run spent training: run.json's `duration_s` (its processes' time from
    attaching to the last write of run.json, resumes summed); for a run.json written before that
    field, from `started_at` to `ended_at` (to now while it runs)."""
    if isinstance(info.get("duration_s"), (int, float)):
        return float(info["duration_s"])
    try:
        start = datetime.fromisoformat(info["started_at"])
        end_text = info.get("ended_at")
        end = datetime.fromisoformat(end_text) if end_text else datetime.now(start.tzinfo)
    except (KeyError, TypeError, ValueError):
        return None
    return max((end - start).total_seconds(), 0.0)


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


def load(path: str | os.PathLike) -> Run:
    """Open the run stored at `path` (a directory holding run.json)."""
    path = Path(path)
    if not (path / RUN_FILE).exists():
        raise FileNotFoundError(f"no {RUN_FILE} in {path}: not a netprobe run directory")
    return Run(path)


def find_runs(path: str | os.PathLike) -> Iterator[Path]:
    """Every run directory at or beneath `path`, in sorted order (numbers by value: a sweep's
    job 2 before its job 10)."""
    path = Path(path)
    if (path / RUN_FILE).exists():
        yield path
        return
    yield from sorted(_runs_beneath(path), key=_natural)


def _natural(path: Path) -> list[tuple[int, int, str]]:
    """A sort key that orders the digits within each part of `path` as numbers."""
    return [
        (0, int(piece), "") if piece.isdigit() else (1, 0, piece)
        for part in path.parts
        for piece in re.split(r"(\d+)", part)
        if piece
    ]


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
    return _open(find_runs(path))


def run_holding(path: str | os.PathLike) -> Path | None:
    """The run directory that `path` lies in (it, or a folder above it, holds a run.json), for
    commands that write only outside runs; None where there is none."""
    where = Path(path).resolve()
    return next((d for d in (where, *where.parents) if (d / RUN_FILE).is_file()), None)


def runs_under(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The run directories at or beneath `paths`, each once however the paths overlap (a run
    given twice, a sweep and one of its runs), in the order found; ConfigError (one line) for a
    path that does not exist or when none holds a run."""
    paths = list(paths)
    found: dict[Path, Path] = {}
    for path in paths:
        if not Path(path).exists():
            raise ConfigError(f"no such file or directory: {path}")
        for run_dir in find_runs(path):
            found.setdefault(run_dir.resolve(), run_dir)
    if not found:
        _no_runs(paths)
    return list(found.values())


def read_runs_under(paths: Iterable[str | os.PathLike]) -> list[Run]:
    """The runs of `runs_under(paths)` opened; one whose run.json cannot be read is skipped, with
    a warning, and ConfigError when none can."""
    paths = list(paths)
    found = runs_under(paths)
    runs = _open(found)
    if not runs:
        raise ConfigError(
            f"no readable runs under {', '.join(map(str, paths))}: {len(found)} found, each with "
            f"a damaged {RUN_FILE} (skipped above)"
        )
    return runs


def _open(run_dirs: Iterable[Path]) -> list[Run]:
    runs = []
    for p in run_dirs:
        try:
            runs.append(Run(p))
        except (OSError, ValueError) as exc:
            warnings.warn(f"skipping run {p}: damaged {RUN_FILE} ({first_line(exc)})", stacklevel=3)
    return runs


def _no_runs(paths: list[str | os.PathLike]) -> None:
    raise ConfigError(f"no runs (directories with run.json) under {', '.join(map(str, paths))}")
