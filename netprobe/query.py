"""Every run under a folder as one set of tables: long DataFrames with a `run` column and config
columns (`load_runs(path).scalars(...)`), and SQL over them (`netprobe query`, DuckDB)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from netprobe.errors import ConfigError, first_line
from netprobe.store import (
    CONFIG_FILE,
    SCHEMAS,
    TABLES,
    Run,
    flatten,
    json_text,
    part_files,
    plain,
    read_runs,
    read_runs_under,
    readable_parts,
    run_holding,
    write_parquet,
    write_text,
)

VIEWS = ("runs", "findings", *TABLES, "layers")
# The `findings` view: one row per doctor finding in a run.json, its evidence as JSON text (its
# keys differ from one finding to the next).
FINDINGS = pa.schema(
    [
        ("run", pa.string()),
        ("code", pa.string()),
        ("severity", pa.string()),
        ("message", pa.string()),
        ("layers", pa.list_(pa.string())),
        ("steps", pa.list_(pa.int64())),
        ("epochs", pa.list_(pa.int64())),
        ("evidence", pa.string()),
        ("advice", pa.string()),
        ("figure", pa.string()),
    ]
)
FORMATS = ("table", "csv", "json", "parquet")


def duckdb() -> Any:
    """The duckdb module, or a one-line ConfigError (exit 2) saying how to install it."""
    try:
        import duckdb
    except ImportError:
        raise ConfigError("netprobe query needs duckdb: pip install duckdb") from None
    return duckdb


# ---------------------------------------------------------------- run.json + config, flattened


_REFERENCE = re.compile(r"\$\{([\w.]+)\}")


def _resolve(flat: dict[str, Any]) -> dict[str, Any]:
    """Resolve `${key}` references between the config's own keys (as Hydra would), without
    OmegaConf: building an OmegaConf object costs 8 ms a run, which is 8 s over a thousand runs.
    Anything else (`${now:...}`, a key that is not there) stays as written."""

    def value(key: str, seen: frozenset[str]) -> Any:
        v = flat.get(key)
        if not isinstance(v, str) or "${" not in v or key in seen:
            return v
        whole = _REFERENCE.fullmatch(v)
        if whole and whole.group(1) in flat:
            return value(whole.group(1), seen | {key})
        return _REFERENCE.sub(
            lambda m: str(value(m.group(1), seen | {key})) if m.group(1) in flat else m.group(0),
            v,
        )

    return {key: value(key, frozenset()) for key in flat}


def read_config(run: Run) -> dict[str, Any]:
    """The run's composed config as dotted keys with references resolved; {} when it has none."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        with open(run.path / CONFIG_FILE) as f:
            data = yaml.load(f, Loader=loader)
    except (OSError, yaml.YAMLError):
        return {}
    return _resolve(flatten(data)) if isinstance(data, Mapping) else {}


def run_record(run: Run, config: Mapping[str, Any]) -> dict[str, Any]:
    """One row of the `runs` view: run.json's fields, then the (flattened) config's keys not
    already there."""
    record = {"run": str(run.path), **flatten(run.info)}
    record["status"] = run.status  # `crashed` for a run whose process is gone
    for key, value in config.items():
        record.setdefault(key, value)
    return record


def finding_row(run: Run, finding: Any) -> dict[str, Any]:
    """One row of the `findings` view from one of run.json's `findings`; a value not of the
    view's type (a run.json edited by hand) reads as null."""
    item = finding if isinstance(finding, Mapping) else {}
    row: dict[str, Any] = {"run": str(run.path)}
    for column in FINDINGS.names[1:]:
        value = item.get(column)
        if column == "evidence":
            row[column] = None if value is None else json_text(value, indent=None)
        else:
            row[column] = value if _fits(value, FINDINGS.field(column).type) else None
    return row


def _fits(value: Any, kind: pa.DataType) -> bool:
    """Whether a value from JSON is of the Arrow type: a string, an int64, or a list of them."""
    if pa.types.is_list(kind):
        return isinstance(value, list) and all(_fits(v, kind.value_type) for v in value)
    if pa.types.is_string(kind):
        return isinstance(value, str)
    return type(value) is int


def records_table(records: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Records with differing keys as one Arrow table; a column whose values do not share one
    type (an int in one run, a string in another) is kept as JSON text."""
    keys = list(dict.fromkeys(k for r in records for k in r))
    columns = {}
    for key in keys:
        values = [r.get(key) for r in records]
        try:
            columns[key] = pa.array(values)
        except (pa.ArrowException, TypeError, ValueError):
            columns[key] = pa.array(
                [v if v is None or isinstance(v, str) else json.dumps(v) for v in values],
                pa.string(),
            )
    return pa.table(columns) if columns else pa.table({"run": pa.array([], pa.string())})


# ---------------------------------------------------------------- the DuckDB views


def _sql_list(paths: Iterable[Path]) -> str:
    return "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths) + "]"


class Catalog:
    """A DuckDB connection whose views `runs`, `findings`, `scalars`, `histograms`, `matrices`
    and `layers` cover the given runs, each with a `run` column (the run's directory). A query
    defines only the views it names: `runs` reads every run's config, `findings` every run.json,
    the others list every part file.
    DuckDB reads the part files where they lie, only the columns and row groups a query needs,
    so a query over thousands of runs reads little more than it returns; a part that does not
    read is skipped with the warning `netprobe.load` gives."""

    def __init__(self, runs: Sequence[Run], configs: Mapping[Path, dict] | None = None) -> None:
        self.runs = list(runs)
        self.configs = dict(configs) if configs is not None else None
        self.con = duckdb().connect()
        self.con.execute("SET enable_progress_bar = false")
        self._parts: dict[str, list[Path]] = {}
        self._defined: set[str] = set()

    def parts(self, table: str) -> list[Path]:
        if table not in self._parts:
            if table == "layers":
                files = [r.path / "layers.parquet" for r in self.runs]
                self._parts[table] = [p for p in files if p.exists()]
            else:
                self._parts[table] = [p for r in self.runs for p in part_files(r.path, table)]
        return self._parts[table]

    def _define(self, sql: str, union: bool = False) -> None:
        for view in VIEWS:
            if re.search(rf"\b{view}\b", sql, re.IGNORECASE) and (
                union or view not in self._defined
            ):
                self._define_view(view, union)
                self._defined.add(view)

    def _define_view(self, view: str, union: bool) -> None:
        if view == "runs":
            if self.configs is None:
                self.configs = {r.path: read_config(r) for r in self.runs}
            records = [run_record(r, self.configs[r.path]) for r in self.runs]
            self.con.register("runs", records_table(records))
            return
        if view == "findings":
            rows = [finding_row(r, f) for r in self.runs for f in r.info.get("findings") or []]
            self.con.register("findings", pa.Table.from_pylist(rows, schema=FINDINGS))
            return
        parts = self.parts(view)
        if not parts:
            self.con.register(f"_empty_{view}", SCHEMAS[view].empty_table())
            body = f"SELECT ''::VARCHAR AS run, * FROM _empty_{view} WHERE false"
        else:
            # Part files lie in RUN/TABLE/, layers.parquet in RUN/. Runs written by other versions
            # may differ in their columns: matched by name then (slower: every footer is read).
            run = (
                "parse_dirpath(filename)"
                if view == "layers"
                else "parse_dirpath(parse_dirpath(filename))"
            )
            source = f"read_parquet({_sql_list(parts)}, filename=true, union_by_name={union})"
            body = f"SELECT {run} AS run, * EXCLUDE (filename) FROM {source}"
        self.con.execute(f"CREATE OR REPLACE VIEW {view} AS {body}")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> pa.Table:
        """Run `sql` and return its result. When it fails on the stored files, it is run again
        with columns matched by name, then without the part files that do not read (each skipped
        with the warning `load` gives). A bad query raises ConfigError."""
        db = duckdb()
        try:
            self._define(sql)
            return self._fetch(sql, params)
        except db.Error as exc:
            if isinstance(exc, db.ParserException) or (
                isinstance(exc, (db.BinderException, db.CatalogException))
                and ".parquet" not in str(exc)
            ):
                raise ConfigError(f"bad query: {first_line(exc)}") from None
        try:
            self._define(sql, union=True)
            return self._fetch(sql, params)
        except db.Error as exc:
            error = exc
        named = [v for v in self._parts if v in self._defined]
        before = sum(len(self._parts[v]) for v in named)
        for view in named:
            self._parts[view] = readable_parts(self._parts[view])
        if before == sum(len(self._parts[v]) for v in named):
            raise ConfigError(f"query failed: {first_line(error)}") from None
        try:
            self._define(sql, union=True)
            return self._fetch(sql, params)
        except db.Error as exc:
            raise ConfigError(f"query failed: {first_line(exc)}") from None

    def _fetch(self, sql: str, params: Sequence[Any]) -> pa.Table:
        relation = self.con.sql(sql, params=list(params) or None)
        if relation is None:  # a statement that returns no rows
            return pa.table({})
        # duckdb 1.4 renamed arrow() to to_arrow_table().
        fetch = getattr(relation, "to_arrow_table", None) or relation.arrow
        return fetch()


# ---------------------------------------------------------------- Python access


class Runs(list):
    """The runs under a folder (a list of `Run`), and each table across all of them as one long
    DataFrame with a `run` column and, as further columns, config keys of your choosing."""

    def scalars(
        self,
        probe: str | None = None,
        metric: str | None = None,
        layer: str | None = None,
        config: Sequence[str] | None = None,
    ) -> pd.DataFrame:
        """Scalars of every run; `config` names config keys (`optim.lr`, `init.name`) to add as
        columns, by default the keys whose values differ between the runs."""
        return self._frame("scalars", config, probe=probe, metric=metric, layer=layer)

    def histograms(
        self,
        probe: str | None = None,
        layer: str | None = None,
        source: str | None = None,
        config: Sequence[str] | None = None,
    ) -> pd.DataFrame:
        return self._frame("histograms", config, probe=probe, layer=layer, source=source)

    def matrices(
        self, probe: str | None = None, name: str | None = None, config: Sequence[str] | None = None
    ) -> pd.DataFrame:
        return self._frame("matrices", config, probe=probe, name=name)

    def layers(self, config: Sequence[str] | None = None) -> pd.DataFrame:
        return self._frame("layers", config)

    def info(self) -> pd.DataFrame:
        """One row per run: run.json's fields and the flattened config (the `runs` view)."""
        configs = self.configs()
        return plain(records_table([run_record(r, configs[r.path]) for r in self]))

    def configs(self) -> dict[Path, dict[str, Any]]:
        """Each run's config as dotted keys (read once)."""
        if getattr(self, "_configs", None) is None:
            self._configs = {r.path: read_config(r) for r in self}
        return self._configs

    def varying(self) -> list[str]:
        """Config keys whose values differ between the runs (`seed`, `init.name`, ...)."""
        return varying_keys(list(self.configs().values()))

    def _frame(self, table: str, config: Sequence[str] | None, **equal: str | None) -> pd.DataFrame:
        where = [(column, value) for column, value in equal.items() if value is not None]
        sql = f"SELECT * FROM {table}"
        if where:
            sql += " WHERE " + " AND ".join(f'"{column}" = ?' for column, _ in where)
        frame = plain(Catalog(self, self.configs()).execute(sql, [v for _, v in where]))
        configs = {str(path): c for path, c in self.configs().items()}
        keys = self.varying() if config is None else list(config)
        if keys:
            unknown = [k for k in keys if not any(k in c for c in configs.values())]
            if unknown:
                known = sorted({k for c in configs.values() for k in c})
                raise ConfigError(
                    f"unknown config key {unknown[0]!r}; valid keys: {', '.join(known)}"
                )
            for key in keys:
                frame[key] = frame["run"].map({run: c.get(key) for run, c in configs.items()})
        return frame


def varying_keys(configs: list[dict[str, Any]]) -> list[str]:
    """The keys whose values differ between the (flattened) configs, in first-seen order."""
    keys = dict.fromkeys(k for c in configs for k in c)
    return [k for k in keys if len({json.dumps(c.get(k), default=str) for c in configs}) > 1]


def load_runs(path: str | os.PathLike) -> Runs:
    """Every run at or beneath `path` (a run whose run.json does not read is skipped, with a
    warning), as a `Runs` list whose `.scalars()`, `.histograms()`, ... span all of them."""
    return Runs(read_runs(path))


def query(paths: Sequence[str | os.PathLike], sql: str) -> pa.Table:
    """The result of `sql`, one read-only statement, over every run under `paths` (views as in
    `Catalog`)."""
    _check_reads_only(sql)
    return Catalog(read_runs_under(paths)).execute(sql)


def _check_reads_only(sql: str) -> None:
    """Refuses anything but one SELECT (or EXPLAIN) statement: a query reads runs, and DuckDB
    would otherwise write wherever a COPY or ATTACH says, a run's own files included."""
    db = duckdb()
    try:
        statements = db.connect().extract_statements(sql)
    except db.Error as exc:
        raise ConfigError(f"bad query: {first_line(exc)}") from None
    kinds = [s.type.name for s in statements]
    if kinds not in (["SELECT"], ["EXPLAIN"]):
        given = ", ".join(kinds) if kinds else "no statement"
        raise ConfigError(
            f"bad query: {given}; netprobe query runs one SELECT statement (write its result "
            "with --out FILE)"
        )


# ---------------------------------------------------------------- `netprobe query` output

SUFFIXES = {".csv": "csv", ".json": "json", ".parquet": "parquet"}
MAX_PRINTED = 200  # rows of a printed table; --format csv prints them all


def output_format(fmt: str | None, out: str | None) -> str:
    """The output format asked for, checked before anything runs (ConfigError when bad)."""
    if fmt is None:
        if out is None:
            return "table"
        fmt = SUFFIXES.get(Path(out).suffix.lower())
        if fmt is None:
            raise ConfigError(
                f"cannot tell the format of --out {out}; give --format csv, json or parquet"
            )
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not valid; valid formats: {', '.join(FORMATS)}")
    if fmt == "parquet" and out is None:
        raise ConfigError("--format parquet needs --out FILE")
    if fmt == "table" and out is not None:
        raise ConfigError("--out needs --format csv, json or parquet")
    if out is not None:
        folder = Path(out).resolve().parent
        if not folder.is_dir():
            raise ConfigError(f"--out {out}: no such directory {folder}")
        run = run_holding(folder)
        if run is not None:
            raise ConfigError(f"--out {out} is inside the run {run}; write it outside any run")
    return fmt


def write_result(table: pa.Table, fmt: str, out: str | None) -> None:
    """Print `table` (a rich table, CSV or JSON), or write it to `out`."""
    if fmt == "parquet":
        write_parquet(Path(out), table)
        return
    if fmt == "table":
        _print_table(table)
        return
    frame = _json_cells(plain(table))
    text = frame.to_csv(index=False) if fmt == "csv" else frame.to_json(orient="records") + "\n"
    if out is None:
        print(text, end="")
    else:
        write_text(Path(out), text)


def _json_cells(frame: pd.DataFrame) -> pd.DataFrame:
    """Lists and structs as JSON text, so that CSV cells and JSON values read back as data."""

    def cell(v: Any) -> Any:
        if hasattr(v, "tolist"):
            v = v.tolist()
        return json.dumps(v, default=str) if isinstance(v, (list, dict)) else v

    for column in frame.columns:
        if frame[column].dtype == object:
            frame[column] = frame[column].map(cell)
    return frame


def _print_table(table: pa.Table) -> None:
    import sys

    from rich.console import Console
    from rich.table import Table

    shown = Table(show_lines=False)
    for name in table.column_names:
        shown.add_column(name, overflow="fold")
    for row in table.slice(0, MAX_PRINTED).to_pylist():
        shown.add_row(*(_cell(v) for v in row.values()))
    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(shown)
    if table.num_rows > MAX_PRINTED:
        print(
            f"netprobe: {table.num_rows} rows, the first {MAX_PRINTED} shown; "
            "--format csv (or --out FILE) gives all",
            file=sys.stderr,
        )


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list) and len(value) > 8:
        return f"[{', '.join(_cell(v) for v in value[:8])}, … {len(value)} values]"
    return str(value)
