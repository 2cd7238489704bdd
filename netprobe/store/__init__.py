"""The run directory (SPEC §3): the only code that reads or writes Parquet and run.json.

`schema` knows the tables' columns, `files` writes files whole and names part files, `writer`
fills a run directory, `reader` and `runs` read runs back."""

from netprobe.store.files import (
    CONFIG_FILE,
    RUN_FILE,
    atomic_write,
    damaged_part,
    json_text,
    manifest,
    now_iso,
    part_files,
    readable_parts,
    write_json,
    write_parquet,
    write_text,
)
from netprobe.store.reader import Run, plain
from netprobe.store.runs import (
    find_runs,
    flatten,
    load,
    read_runs,
    read_runs_under,
    run_seconds,
    runs_under,
)
from netprobe.store.schema import (
    SCHEMAS,
    TABLES,
    HistogramBlock,
    MatrixBlock,
    ScalarBlock,
    graph_table,
    histogram_table,
    layers_table,
    matrix_table,
    rows_table,
    scalar_table,
)
from netprobe.store.writer import STATUSES, RunWriter, drop_rows_after, read_info, update_info

__all__ = [
    "CONFIG_FILE",
    "RUN_FILE",
    "SCHEMAS",
    "STATUSES",
    "TABLES",
    "HistogramBlock",
    "MatrixBlock",
    "Run",
    "RunWriter",
    "ScalarBlock",
    "atomic_write",
    "damaged_part",
    "drop_rows_after",
    "find_runs",
    "flatten",
    "graph_table",
    "histogram_table",
    "json_text",
    "layers_table",
    "load",
    "manifest",
    "matrix_table",
    "now_iso",
    "part_files",
    "plain",
    "read_info",
    "read_runs",
    "read_runs_under",
    "readable_parts",
    "rows_table",
    "run_seconds",
    "runs_under",
    "scalar_table",
    "update_info",
    "write_json",
    "write_parquet",
    "write_text",
]
