"""SQL over every run (`netprobe query`) and long tables across runs (`load_runs(...).scalars()`),
each checked against pandas computations on the runs loaded one by one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

import netprobe
from netprobe.cli import main as cli
from netprobe.errors import ConfigError
from netprobe.query import query

PROBES = "probes=[gradients,activations]"


@pytest.fixture(scope="module")
def root(tmp_path_factory, train_tiny) -> Path:
    """Two seeds of the default initializer, and one all-zero initialization (dead units)."""
    root = tmp_path_factory.mktemp("query") / "runs"
    train_tiny(root / "a", PROBES, "seed=0")
    train_tiny(root / "b", PROBES, "seed=1")
    train_tiny(root / "z", PROBES, "seed=0", "init=zeros")
    return root


def each_run(root: Path) -> list[netprobe.Run]:
    return [netprobe.load(root / name) for name in ("a", "b", "z")]


def sql(root: Path, text: str) -> pd.DataFrame:
    return query([root], text).to_pandas()


def flat_config(run: netprobe.Run) -> dict:
    return pd.json_normalize(run.config, sep=".").iloc[0].to_dict()


def test_best_val_acc_per_init_over_seeds(root):
    got = sql(
        root,
        """SELECT r."init.name" AS init, avg(s.best) AS mean_best, count(*) AS n
           FROM (SELECT run, max(value) AS best FROM scalars WHERE metric = 'val_acc'
                 GROUP BY run) s
           JOIN runs r USING (run) GROUP BY ALL ORDER BY init""",
    )
    rows = [
        {"init": r.config["init"]["name"], "best": r.scalars(metric="val_acc")["value"].max()}
        for r in each_run(root)
    ]
    expected = pd.DataFrame(rows).groupby("init")["best"].agg(["mean", "count"]).reset_index()
    assert got["init"].tolist() == expected["init"].tolist() == ["default", "zeros"]
    assert got["mean_best"].tolist() == pytest.approx(expected["mean"].tolist(), rel=1e-12)
    assert got["n"].tolist() == expected["count"].tolist() == [2, 1]


def test_layer_whose_gradient_l2_fell_most(root):
    got = sql(
        root,
        """WITH ends AS (
             SELECT run, layer, arg_min(value, step) AS first, arg_max(value, step) AS last
             FROM scalars WHERE probe = 'gradients' AND metric = 'l2' AND layer <> ''
             GROUP BY run, layer)
           SELECT run, arg_max(layer, first - last) AS layer, max(first - last) AS fall
           FROM ends GROUP BY run ORDER BY run""",
    )
    falls = {}
    for run in each_run(root):
        df = run.scalars(probe="gradients", metric="l2")
        df = df[df["layer"] != ""].sort_values("step")
        ends = df.groupby("layer")["value"].agg(["first", "last"])
        falls[str(run.path)] = ends["first"] - ends["last"]
    assert got["run"].tolist() == list(falls)
    # All-zero weights give several layers the same (zero) fall: any of them is right.
    for row in got.itertuples():
        fall = falls[row.run]
        assert row.fall == pytest.approx(fall.max(), rel=1e-12)
        assert fall[row.layer] == pytest.approx(fall.max(), rel=1e-12)
    assert got["layer"].iloc[0] == falls[got["run"].iloc[0]].idxmax()


def test_runs_whose_dead_frac_exceeded_half(root):
    got = sql(
        root,
        # The activations probe names its metrics by input source: train/dead_frac, ...
        """SELECT run, max(value) AS dead_frac FROM scalars WHERE metric LIKE '%/dead_frac'
           GROUP BY run HAVING max(value) > 0.5 ORDER BY run""",
    )
    expected = {}
    for run in each_run(root):
        df = run.scalars(probe="activations")
        worst = df[df["metric"].str.endswith("/dead_frac")]["value"].max()
        if worst > 0.5:
            expected[str(run.path)] = worst
    assert expected and str(root / "z") in expected
    assert dict(zip(got["run"], got["dead_frac"])) == expected


def test_runs_view_holds_run_json_and_the_flattened_config(root):
    got = sql(
        root,
        'SELECT run, status, best_val_acc, "final.val_acc", "optim.lr", "init.name", '
        '"model.image_size", seed, probes FROM runs ORDER BY run',
    )
    for row, run in zip(got.itertuples(index=False), each_run(root)):
        config = flat_config(run)
        assert row.run == str(run.path)
        assert row.status == run.info["status"] == "completed"
        assert row.best_val_acc == run.info["best_val_acc"]
        assert row[3] == run.info["final"]["val_acc"]
        assert row[4] == config["optim.lr"]
        assert row[5] == config["init.name"]
        assert row[6] == config["data.image_size"]  # `${data.image_size}` resolved
        assert row.seed == run.info["seed"]
        assert list(row.probes) == run.info["probes"]


@pytest.fixture(scope="module")
def diagnosed(root, tmp_path_factory) -> Path:
    """The runs with their findings kept in run.json, as `netprobe train` ends them."""
    from netprobe.doctor import close_run

    copy = tmp_path_factory.mktemp("diagnosed") / "runs"
    shutil.copytree(root, copy)
    for name in ("a", "b", "z"):
        close_run(copy / name)
    return copy


def test_findings_view_has_a_row_per_finding_of_each_run_json(diagnosed):
    got = query([diagnosed], "SELECT * FROM findings ORDER BY run, code")
    expected = [
        {"run": str(diagnosed / name), **f}
        for name in ("a", "b", "z")
        for f in json.loads((diagnosed / name / "run.json").read_text())["findings"]
    ]
    assert any(row["code"] == "symmetric_init" for row in expected)  # init=zeros
    expected.sort(key=lambda row: (row["run"], row["code"]))
    assert got.column_names == list(expected[0])
    for row, want in zip(got.to_pylist(), expected, strict=True):
        assert {**row, "evidence": json.loads(row["evidence"])} == want
    # The evidence is JSON text, which DuckDB's JSON operators read.
    zeros = sql(
        diagnosed, "SELECT evidence->>'init' AS i FROM findings WHERE code = 'symmetric_init'"
    )
    assert zeros["i"].tolist() == ["zeros"]


def test_findings_view_reads_an_odd_finding_as_nulls(tmp_path, root):
    run = tmp_path / "runs" / "a"
    shutil.copytree(root / "a", run)
    info = json.loads((run / "run.json").read_text())
    odd = {"code": "x", "layers": "net.1.weight", "steps": [1.5, 2], "epochs": [0, 1]}
    (run / "run.json").write_text(json.dumps({**info, "findings": [odd, "not a finding"]}))
    rows = query([tmp_path / "runs"], "SELECT * FROM findings ORDER BY code").to_pylist()
    nulls = {**dict.fromkeys(rows[0], None), "run": str(run)}
    assert rows == [{**nulls, "code": "x", "epochs": [0, 1]}, nulls]
    empty = sql(tmp_path / "runs", "SELECT * FROM findings WHERE severity = 'error'")
    assert empty.empty and list(empty.columns)[:3] == ["run", "code", "severity"]


def test_every_view_has_each_runs_rows(root):
    runs = each_run(root)
    for table in ("scalars", "histograms", "layers"):
        got = sql(root, f"SELECT run, count(*) AS n FROM {table} GROUP BY run ORDER BY run")
        assert got["n"].tolist() == [len(getattr(r, table)()) for r in runs], table
    matrices = sql(root, "SELECT * FROM matrices")
    assert matrices.empty and list(matrices.columns)[:3] == ["run", "step", "epoch"]
    order = ["step", "layer", "source"]
    hist = sql(
        root, f"SELECT * FROM histograms WHERE run = '{root / 'b'}' ORDER BY {', '.join(order)}"
    )
    stored = runs[1].histograms().sort_values(order)
    assert [list(c) for c in hist["counts"]] == [list(c) for c in stored["counts"]]


def test_load_runs_gives_one_long_table_with_config_columns(root):
    runs = netprobe.load_runs(root)
    assert [r.path for r in runs] == [root / n for n in ("a", "b", "z")]
    configs = {str(r.path): flat_config(r) for r in runs}
    varying = sorted(
        k
        for k in set().union(*configs.values())
        if len({json.dumps(c.get(k)) for c in configs.values()}) > 1
    )
    assert {"seed", "init.name"} <= set(varying)
    got = runs.scalars(metric="val_acc")
    assert sorted(got.columns[7:]) == varying
    parts = []
    for run in each_run(root):
        df = run.scalars(metric="val_acc")
        df.insert(0, "run", str(run.path))
        parts.append(df)
    expected = pd.concat(parts, ignore_index=True)
    pd.testing.assert_frame_equal(got[expected.columns], expected)
    assert got["seed"].tolist() == [configs[r]["seed"] for r in got["run"]]
    assert got["init.name"].tolist() == [configs[r]["init.name"] for r in got["run"]]

    chosen = runs.scalars(probe="gradients", layer="", config=["optim.lr"])
    assert list(chosen.columns) == [*expected.columns, "optim.lr"]
    assert (chosen["metric"] == "grad_l2_total").all() and (chosen["optim.lr"] == 0.001).all()
    assert len(chosen) == sum(len(r.scalars(probe="gradients", layer="")) for r in runs)
    hists = runs.histograms(source="valid", config=[])
    assert len(hists) == sum(len(r.histograms(source="valid")) for r in runs)
    assert list(hists.columns) == ["run", *runs[0].histograms().columns]
    with pytest.raises(
        ConfigError, match="unknown config key 'optim.nope'; valid keys: .*optim.lr"
    ):
        runs.scalars(config=["optim.nope"])


def test_damaged_parts_are_skipped_with_the_load_warning(root, tmp_path, capsys):
    copy = tmp_path / "runs" / "a"
    shutil.copytree(root / "a", copy)
    part = sorted((copy / "scalars").glob("part-*.parquet"))[1]
    part.write_bytes(part.read_bytes()[:80])
    with pytest.warns(UserWarning, match=f"skipping unreadable part file {part}"):
        expected = len(netprobe.load(copy).scalars())
    with pytest.warns(UserWarning, match=f"skipping unreadable part file {part}"):
        got = sql(tmp_path / "runs", "SELECT count(*) AS n FROM scalars")
    assert got["n"].tolist() == [expected]
    capsys.readouterr()
    assert cli(["query", str(tmp_path / "runs"), "SELECT count(*) AS n FROM scalars"]) == 0
    out = capsys.readouterr()
    assert f"netprobe: warning: skipping unreadable part file {part}" in out.err
    assert str(expected) in out.out


def test_output_formats(root, tmp_path, capsys):
    text = (
        "SELECT run, step, metric, value FROM scalars WHERE metric = 'val_loss' ORDER BY run, step"
    )
    expected = sql(root, text)
    assert len(expected) == 6
    capsys.readouterr()
    assert cli(["query", str(root), text, "--format", "csv"]) == 0
    csv = tmp_path / "out.csv"
    csv.write_text(capsys.readouterr().out)
    pd.testing.assert_frame_equal(pd.read_csv(csv), expected)
    assert cli(["query", str(root), text, "--out", str(tmp_path / "out.json")]) == 0
    pd.testing.assert_frame_equal(
        pd.DataFrame(json.loads((tmp_path / "out.json").read_text())), expected
    )
    assert (
        cli(["query", str(root), text, "--format", "parquet", "--out", str(tmp_path / "o.pq")]) == 0
    )
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "o.pq"), expected)
    assert cli(["query", str(root), text]) == 0
    printed = capsys.readouterr().out
    assert "val_loss" in printed and f"{expected['value'].iloc[0]:.6g}" in printed


@pytest.mark.parametrize(
    "args, message",
    [
        (["SELECT 1", "--format", "xml"], "--format 'xml' is not valid; valid formats: table, csv"),
        (["SELECT 1", "--format", "parquet"], "--format parquet needs --out FILE"),
        (["SELECT 1", "--out", "OUT.txt"], "cannot tell the format of --out"),
        (["SELECT * FROM nope", "--out", "OUT.csv"], "bad query: Catalog Error"),
        (["SELEC 1", "--out", "OUT.csv"], "bad query: Parser Error"),
        (["", "--out", "OUT.csv"], "bad query: no statement; netprobe query runs one SELECT"),
        (["SELECT 1; SELECT 2"], "bad query: SELECT, SELECT; netprobe query runs one SELECT"),
        (["COPY (SELECT 1) TO 'OUT.csv'"], "bad query: COPY; netprobe query runs one SELECT"),
        (["ATTACH 'OUT.db'"], "bad query: ATTACH"),
        (["CREATE TABLE t AS SELECT 1"], "bad query: CREATE"),
        ([], "the following arguments are required: SQL"),
    ],
)
def test_bad_queries_are_one_line_exit_2(root, tmp_path, capsys, args, message):
    args = [a.replace("OUT", str(tmp_path / "out")) for a in args]
    capsys.readouterr()
    assert cli(["query", str(root), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_a_query_never_writes_into_a_run(root, capsys):
    run = next(p.parent for p in sorted(root.rglob("run.json")))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for out in (run / "run.json", run / "scalars" / "q.csv"):
        capsys.readouterr()
        assert cli(["query", str(root), "SELECT 1 AS a", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"is inside the run {run}" in err[0], err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_query_of_no_runs_is_one_line_exit_2(tmp_path, capsys):
    assert cli(["query", str(tmp_path), "SELECT 1"]) == 2
    assert "no runs (directories with run.json)" in capsys.readouterr().err


def test_without_duckdb_installed_it_is_one_line_exit_2(root, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "duckdb", None)  # `import duckdb` fails
    assert cli(["query", str(root), "SELECT 1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["netprobe: netprobe query needs duckdb: pip install duckdb"]
