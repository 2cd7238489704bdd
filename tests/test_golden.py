"""Fixed small runs compared with stored golden copies of their tables, to the last bit.

A refactor must not change a stored number. When a change is meant to (a fixed formula), rewrite
the copies with `NETPROBE_WRITE_GOLDEN=1 pytest tests/test_golden.py` and say why in the commit.
The copies are PyTorch's path (NETPROBE_NATIVE=0, available everywhere); the fused CPU kernels
sum in another order, so their values agree to FUSED_REL and everything else to the last bit.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import netprobe
from netprobe.store import TABLES, write_parquet
from tests.helpers import torch_threads

GOLDEN = Path(__file__).parent / "golden"
# Every probe at its default schedule; the synthetic data and the seed fix every number.
# Small widths and feature counts keep the copies to a few hundred kB.
SMALL = ("probes.correlation.max_features=16", "probes.augmentation.samples=40")
RUNS = {
    "cnn_all": ("model=cnn", "model.width=8", "model.hidden=16", "probes=all", *SMALL),
    "mlp_all": ("model=mlp", "model.hidden=[32,16]", "probes=all", "optim=adam", *SMALL),
}
# Measured, not computed: throughput depends on the machine.
TIMED = ("samples_per_s",)
# What the fused kernels compute (netprobe.native): float32 sums of 16 values per lane, then
# float64, within ~1e-7 of an exact sum; PyTorch's float32 norm along a dimension is further off
# (2.8e-6 on the 6,144 near-equal squares of a first Adam update). The activations kernel sums
# in float64 in another order (~1e-13 apart). Counts are exact on both.
FUSED_PROBES = ("gradients", "optim_dynamics", "activations")
FUSED_METRICS = ("grad_l2_total",)
FUSED_REL = 1e-5


def _tables(run: netprobe.Run) -> dict[str, pa.Table]:
    tables = {name: run.table(name) for name in TABLES}
    scalars = tables["scalars"]
    tables["scalars"] = scalars.filter(pc.invert(pc.is_in(scalars["metric"], pa.array(TIMED))))
    tables["layers"] = pa.Table.from_pandas(run.layers(), preserve_index=False)
    tables["graph"] = pa.Table.from_pandas(run.graph(), preserve_index=False)
    return tables


def _fused(want: pa.Table, i: int) -> bool:
    """Whether row i of a table holds a value the fused kernels compute."""
    names = want.column_names
    return ("probe" in names and want["probe"][i].as_py() in FUSED_PROBES) or (
        "metric" in names and want["metric"][i].as_py() in FUSED_METRICS
    )


def _first_difference(name: str, got: pa.Table, want: pa.Table, fused: bool) -> str:
    if got.schema != want.schema:
        return f"{name}: schema {got.schema} != golden {want.schema}"
    if got.num_rows != want.num_rows:
        return f"{name}: {got.num_rows} rows != golden {want.num_rows}"
    for column in want.column_names:
        a, b = got[column].to_pylist(), want[column].to_pylist()
        for i, (x, y) in enumerate(zip(a, b)):
            if x == y or (x != x and y != y):  # NaN equals NaN here
                continue
            if not (fused and column == "value" and _fused(want, i)) or abs(
                x - y
            ) > FUSED_REL * abs(y):
                row = {
                    c: want[c][i].as_py()
                    for c in ("step", "probe", "layer", "metric")
                    if c in want.column_names
                }
                return f"{name}.{column} row {i} {row}: {x!r} != golden {y!r}"
    return ""


@pytest.mark.parametrize("case", sorted(RUNS))
def test_tables_match_the_golden_copy(
    case: str, kernel_path: str, tmp_path: Path, train_tiny
) -> None:
    with torch_threads(1):  # one reduction order, whatever the machine
        run = netprobe.load(train_tiny(tmp_path / case, *RUNS[case]))
    tables = _tables(run)
    folder = GOLDEN / case
    if os.environ.get("NETPROBE_WRITE_GOLDEN") and kernel_path == "torch":
        folder.mkdir(parents=True, exist_ok=True)
        for name, table in tables.items():
            write_parquet(folder / f"{name}.parquet", table)
    assert sorted(p.stem for p in folder.glob("*.parquet")) == sorted(tables)
    differences = [
        _first_difference(
            name, table, pq.read_table(folder / f"{name}.parquet"), kernel_path != "torch"
        )
        for name, table in tables.items()
    ]
    assert not any(differences), "\n".join(d for d in differences if d)
    assert tables["histograms"].num_rows and tables["matrices"].num_rows
