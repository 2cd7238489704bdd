"""Fixed small runs compared with stored golden copies of their tables, to the last bit.

A refactor must not change a stored number. When a change is meant to (a fixed formula), rewrite
the copies with `NETPROBE_WRITE_GOLDEN=1 pytest tests/test_golden.py` and say why in the commit.

PyTorch's float32 kernels round differently from one CPU to another (the instruction set ATen
and oneDNN pick, MKL's code path): a forward's last bit differs, and 14 steps later so do
histogram counts. So the golden runs train in a fresh interpreter with those pinned to code meant
to give the same bits on every x86-64 CPU (PINNED: ATen's default kernels, oneDNN off, MKL's
reproducible COMPATIBLE path, one thread), on PyTorch's path of the probes. The copies are kept
under the name `machine()` gives that arrangement; where it computes other bits (another
architecture, say), the comparison is skipped, saying how to write copies there.

The fused CPU kernels sum in another order: a run on each of their paths agrees with a run on
PyTorch's path in this process to FUSED_REL on what they compute, and to the last bit elsewhere.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

import netprobe
from netprobe import native
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
# Meant to make PyTorch's float32 bits the same on every x86-64 CPU, for a fresh interpreter
# (ATen reads its setting once, at start); the driver turns oneDNN off and takes one thread.
PINNED = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE,STRICT", "NETPROBE_NATIVE": "0"}
DRIVER = """
import sys
from pathlib import Path

import torch

torch.backends.mkldnn.enabled = False
torch.set_num_threads(1)
from netprobe.config import compose
from netprobe.train import train
from tests.conftest import TINY
from tests.test_golden import RUNS, machine

root = Path(sys.argv[1])
for case, overrides in RUNS.items():
    train(compose([*TINY, *overrides]), root / case)
(root / "machine").write_text(machine())
"""
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
    """How PyTorch rounds float32 here on one thread, as a name: a hash of the bits that the ops
    the golden runs train with (the cnn's and mlp's layers at their shapes, the losses, their
    gradients, the reductions the probes take, an Adam step) give on fixed inputs. Settings that
    change the runs' bits change it: unpinned, oneDNN's or ATen's instruction set; pinned, MKL's
    code path (MKL_CBWR=AVX2 for COMPATIBLE); MKL_ENABLE_INSTRUCTIONS changes neither there.
    The layers are written out in PyTorch's ops rather than built from netprobe's models: a change
    to netprobe must fail the comparison, not rename the machine and skip it."""
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
def pinned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Each golden run trained as PINNED says, in a fresh interpreter: its folder, and in
    `machine` the name of the bits it computed."""
    root = tmp_path_factory.mktemp("golden")
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, str(root)],
        cwd=Path(__file__).parent.parent,
        env={**os.environ, **PINNED},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return root


@pytest.mark.parametrize("case", sorted(RUNS))
def test_tables_match_the_golden_copy(case: str, pinned: Path) -> None:
    name = (pinned / "machine").read_text()
    folder = GOLDEN / name / case
    tables = _tables(netprobe.load(pinned / case))
    if os.environ.get("NETPROBE_WRITE_GOLDEN"):
        folder.mkdir(parents=True, exist_ok=True)
        for table, rows in tables.items():
            write_parquet(folder / f"{table}.parquet", rows)
    elif not folder.is_dir():
        known = sorted(p.name for p in GOLDEN.iterdir() if p.is_dir())
        pytest.skip(
            f"no golden copies for the bits PyTorch computes here, pinned ({name}; copies are "
            f"kept for {', '.join(known) or 'none'}): `NETPROBE_WRITE_GOLDEN=1 pytest "
            "tests/test_golden.py` writes them"
        )
    assert sorted(p.stem for p in folder.glob("*.parquet")) == sorted(tables)
    differences = [
        _first_difference(table, rows, pq.read_table(folder / f"{table}.parquet"), fused=False)
        for table, rows in tables.items()
    ]
    assert not any(differences), "\n".join(d for d in differences if d)
    assert tables["histograms"].num_rows and tables["matrices"].num_rows


@pytest.fixture(scope="module")
def pytorch_tables(tmp_path_factory: pytest.TempPathFactory, train_tiny) -> dict[str, dict]:
    """Each golden run trained in this process on PyTorch's path of the probes: its tables."""
    root = tmp_path_factory.mktemp("pytorch")
    tables = {}
    with pytest.MonkeyPatch.context() as patch, torch_threads(1):
        patch.setattr(native, "ENABLED", False)
        for case, overrides in RUNS.items():
            tables[case] = _tables(netprobe.load(train_tiny(root / case, *overrides)))
    return tables


@pytest.mark.parametrize("kernel_path", ["fused", "fused-py"], indirect=True)
@pytest.mark.parametrize("case", sorted(RUNS))
def test_the_fused_paths_agree_with_pytorchs(
    case: str, kernel_path: str, pytorch_tables: dict[str, dict], tmp_path: Path, train_tiny
) -> None:
    with torch_threads(1):
        tables = _tables(netprobe.load(train_tiny(tmp_path / case, *RUNS[case])))
    want = pytorch_tables[case]
    differences = [
        _first_difference(table, rows, want[table], fused=True) for table, rows in tables.items()
    ]
    assert not any(differences), "\n".join(d for d in differences if d)
