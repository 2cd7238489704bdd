"""Fixed small runs compared with stored golden copies of their tables, to the last bit.

A refactor must not change a stored number. When a change is meant to (a fixed formula), rewrite
the copies with `NETPROBE_WRITE_GOLDEN=1 pytest tests/test_golden.py` and say why in the commit.
The copies are PyTorch's path (NETPROBE_NATIVE=0, available everywhere); the fused CPU kernels
sum in another order, so their values agree to FUSED_REL and everything else to the last bit.

PyTorch's own float32 kernels round differently from one machine to another (the instruction set
oneDNN and ATen pick, the BLAS code path): a forward's last bit differs, and 14 steps later so do
histogram counts. So the copies are kept per machine class, under the name `machine()` gives
this one, and a machine without copies of its own skips the comparison, saying how to write them.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

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


def machine() -> str:
    """How this machine's PyTorch rounds float32 on one thread, as a name: a hash of the bits
    that the ops the golden runs train with (the cnn's and mlp's layers at their shapes, the
    losses, their gradients, the reductions the probes take, an Adam step) give on fixed inputs.
    Two machines whose runs differ in a bit differ here: pinning oneDNN or ATen to another
    instruction set changes both."""
    g = torch.Generator().manual_seed(0)

    def weights(*shape: int) -> torch.Tensor:
        fan_in = torch.Size(shape[1:]).numel() if len(shape) > 1 else shape[0]
        return (torch.randn(*shape, generator=g) * fan_in**-0.5).requires_grad_()

    with torch_threads(1):
        x = torch.randn(32, 3, 8, 8, generator=g)
        y = torch.randint(0, 10, (32,), generator=g)
        convs = [weights(8, 3, 3, 3), weights(8), weights(16, 8, 3, 3), weights(16)]
        convs += [weights(16, 16, 3, 3), weights(16)]
        h = x
        for i in range(3):
            h = F.relu(F.conv2d(h, convs[2 * i], convs[2 * i + 1], padding=1))
            h = F.max_pool2d(h, 2) if i < 2 else F.adaptive_avg_pool2d(h, 2)
        cnn = [weights(16, 64), weights(16), weights(10, 16), weights(10)]
        cnn_logits = F.linear(F.relu(F.linear(h.flatten(1), *cnn[:2])), *cnn[2:])
        mlp = [weights(32, 192), weights(32), weights(16, 32), weights(16), weights(10, 16)]
        mlp += [weights(10)]
        h = x.flatten(1)
        for i in range(2):
            h = F.linear(h, mlp[2 * i], mlp[2 * i + 1])
            h = F.relu(F.batch_norm(h, None, None, training=True))
        mlp_logits = F.linear(h, *mlp[4:])
        params = convs + cnn + mlp
        loss = F.cross_entropy(cnn_logits, y) + F.cross_entropy(mlp_logits, y)
        grads = list(torch.autograd.grad(loss, params))
        h = h.detach()
        outputs = [cnn_logits, mlp_logits, loss, *grads, h.T @ h, h.std(0), h.mean(1)]
        outputs += [torch.linalg.vector_norm(h, dim=1), *torch._foreach_norm(grads)]
        stepped = [p.detach().clone() for p in params]
        for p, grad in zip(stepped, grads):
            p.grad = grad
        torch.optim.Adam(stepped, lr=1e-3).step()
    data = b"".join(t.detach().numpy().tobytes() for t in outputs + stepped)
    return hashlib.sha256(data).hexdigest()[:16]


@pytest.fixture(scope="module")
def copies() -> Path:
    """This machine's folder of golden copies (one per run)."""
    return GOLDEN / machine()


@pytest.mark.parametrize("case", sorted(RUNS))
def test_tables_match_the_golden_copy(
    case: str, kernel_path: str, copies: Path, tmp_path: Path, train_tiny
) -> None:
    folder = copies / case
    writing = bool(os.environ.get("NETPROBE_WRITE_GOLDEN")) and kernel_path == "torch"
    if not writing and not folder.is_dir():
        known = sorted(p.name for p in GOLDEN.iterdir() if p.is_dir())
        pytest.skip(
            f"no golden copies for this machine's float32 kernels ({copies.name}; copies are "
            f"kept for {', '.join(known) or 'none'}): `NETPROBE_WRITE_GOLDEN=1 pytest "
            "tests/test_golden.py` writes them"
        )
    with torch_threads(1):  # one reduction order, whatever the machine
        run = netprobe.load(train_tiny(tmp_path / case, *RUNS[case]))
    tables = _tables(run)
    if writing:
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
