"""Run.matrix: one capture of a stored matrix as a labelled 2-D DataFrame."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn as nn

import netprobe
from tests.helpers import train_steps

MODULES = ["0", "2", "5"]  # the conv and linear layers of `net`, in forward order


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 3 * 3, 3),
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> netprobe.Run:
    """Two epochs of two steps: captures at steps 0 (start), 2 (epoch 0) and 4 (epoch 1)."""
    path = tmp_path_factory.mktemp("matrix") / "run"
    model = net()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, 8, 8, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probes = {"correlation": {"cka": "both", "max_features": 20}, "channels": {}}
    with netprobe.attach(model, path, probes, (x, y), optimizer=opt) as mon:
        for _ in range(2):
            train_steps(mon, model, opt, zip(x.split(8), y.split(8)))
            mon.end_epoch()
    return netprobe.load(path)


def stored_pair(run: netprobe.Run, name: str, step: int, a: str, b: str) -> float:
    df = run.matrices("correlation", name)
    df = df[df["step"] == step]
    hit = df[((df["row"] == a) & (df["col"] == b)) | ((df["row"] == b) & (df["col"] == a))]
    assert len(hit) == 1
    return float(hit["values"].iloc[0][0])


@pytest.mark.parametrize("name", ["cka", "cka_unbiased", "corr_mean"])
def test_pair_values_become_a_symmetric_layer_matrix(run: netprobe.Run, name: str) -> None:
    for kwargs, step in (({}, 4), ({"epoch": 0}, 2), ({"step": 0}, 0), ({"epoch": 1}, 4)):
        m = run.matrix(name, **kwargs)
        assert list(m.index) == MODULES and list(m.columns) == MODULES
        assert (m.index.name, m.columns.name) == ("row", "col")
        assert m.dtypes.eq(np.float64).all()
        for a in MODULES:
            for b in MODULES:
                assert m.loc[a, b] == stored_pair(run, name, step, a, b)
    if name.startswith("cka"):
        np.testing.assert_allclose(np.diag(run.matrix(name)), 1.0, rtol=1e-12)


def test_one_full_matrix_keeps_its_shape_and_names_its_axes(run: netprobe.Run) -> None:
    m = run.matrix("C", step=0, row="0", col="2")
    df = run.matrices("correlation", "C")
    hit = df[(df["step"] == 0) & (df["row"] == "0") & (df["col"] == "2")].iloc[0]
    np.testing.assert_array_equal(m.to_numpy(), np.reshape(hit["values"], hit["shape"]))
    assert m.shape == (4, 6) and (m.index.name, m.columns.name) == ("0", "2")


def test_vectors_per_layer_stack_padded(run: netprobe.Run) -> None:
    m = run.matrix("emission")
    assert list(m.index) == ["0", "2"] and m.shape == (2, 6)  # 4 and 6 output channels
    assert m.loc["0"].isna().tolist() == [False] * 4 + [True] * 2
    df = run.matrices("channels", "emission")
    np.testing.assert_array_equal(m.loc["2"].to_numpy(), df[df["row"] == "2"]["values"].iloc[0])


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda r: r.matrix("C", step=0), ValueError, ["6 'C' matrices", "row='0' col='2'"]),
        (lambda r: r.matrix("nope"), KeyError, ["'nope'", "cka_unbiased", "corr_mean"]),
        (lambda r: r.matrix("cka", epoch=7), KeyError, ["epoch=7", "step 0 (epoch 0)", "step 4"]),
        (lambda r: r.matrix("cka", step=3), KeyError, ["step=3", "step 2 (epoch 0)"]),
    ],
)
def test_ambiguous_or_missing_matrices_say_what_is_there(run, call, error, words) -> None:
    with pytest.raises(error) as raised:
        call(run)
    for word in words:
        assert word in str(raised.value), (word, str(raised.value))


def test_parts_with_float32_values_stay_readable(run: netprobe.Run, tmp_path: Path) -> None:
    """Parts written when matrices held list<float32> values read back as float64."""
    old = pa.Table.from_pydict(
        {"step": [9], "epoch": [5], "probe": ["correlation"], "name": ["cka"], "row": ["0"],
         "col": ["0"], "shape": [[1]], "values": [[0.25]]},
        schema=pa.schema([("step", pa.int64()), ("epoch", pa.int32()), ("probe", pa.string()),
                          ("name", pa.string()), ("row", pa.string()), ("col", pa.string()),
                          ("shape", pa.list_(pa.int32())), ("values", pa.list_(pa.float32()))]),
    )  # fmt: skip
    copy = tmp_path / "run"
    copy.mkdir()
    for item in ("run.json", "layers.parquet"):
        (copy / item).write_bytes((run.path / item).read_bytes())
    (copy / "matrices").mkdir()
    parts = sorted((run.path / "matrices").glob("part-*.parquet"))
    pq.write_table(old, copy / "matrices" / "part-000000.parquet")  # the older part comes first
    for i, part in enumerate(parts, start=1):
        (copy / "matrices" / f"part-{i:06d}.parquet").write_bytes(part.read_bytes())
    again = netprobe.load(copy)
    values = again.matrices("correlation", "cka")
    assert len(values) == len(run.matrices("correlation", "cka")) + 1
    assert again.matrix("cka").loc["0", "0"] == 0.25
    newest = again.matrix("cka", step=4)
    pd.testing.assert_frame_equal(newest, run.matrix("cka"))
    assert newest.loc["0", "2"] == stored_pair(run, "cka", 4, "0", "2")  # not rounded to float32
