"""Run: a stored run read back, each table as a DataFrame (or Arrow table), read once while its
files stay the same."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from netprobe.lifecycle import effective_status
from netprobe.store.files import (
    CONFIG_FILE,
    RUN_FILE,
    manifest,
    part_files,
    read_file,
    read_parts,
)
from netprobe.store.schema import TABLES

if TYPE_CHECKING:
    import pandas as pd


# What run.json's `final` holds: the last of each training curve.
FINAL_METRICS = ("loss", "acc", "val_loss", "val_acc")


@dataclass(frozen=True)
class Results:
    """A run's last loss, accuracy and validation results. `final`: run.json's `final`, written
    as the run closed; else the last values its scalars hold of a run that never closed (crashed,
    or still running), which say where training stood then, not where it ended."""

    values: dict[str, float]
    final: bool
    epochs: int | None  # whole epochs behind the validation values; None where none was recorded


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

    def results(self) -> Results:
        """The run's final results (run.json's `final`) once it closed; before that (crashed,
        running), the last finite value of each training curve its scalars recorded."""
        if self.status not in ("running", "crashed"):
            return Results(dict(self.info.get("final") or {}), True, self.info.get("epochs_done"))
        df = self.scalars(probe="train")
        if df.empty:  # killed before its first rows were written
            return Results({}, False, None)
        df = df[df["metric"].isin(FINAL_METRICS)].sort_values("step", kind="stable")
        last = df[df["value"].map(math.isfinite)].groupby("metric").last()
        values = {m: float(last.at[m, "value"]) for m in FINAL_METRICS if m in last.index}
        epochs = [int(last.at[m, "epoch"]) + 1 for m in ("val_acc", "val_loss") if m in values]
        return Results(values, False, max(epochs) if epochs else None)

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
            cached = self._cache[table] = (key, plain(read_file(path, table)))
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
        data = read_parts(parts, table)
        self._cache[table] = (key, data)
        return data


def plain(table: pa.Table) -> pd.DataFrame:
    """To pandas with dictionary columns as plain strings, so users never meet categoricals."""
    fields = [
        pa.field(f.name, pa.string()) if pa.types.is_dictionary(f.type) else f for f in table.schema
    ]
    return table.cast(pa.schema(fields)).to_pandas()
