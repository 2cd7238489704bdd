"""The run directory and its tables match SPEC §3."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import netprobe
from netprobe.errors import ConfigError
from netprobe.lifecycle import claim_run_dir
from netprobe.store import RunWriter, ScalarBlock, runs_under, scalar_table, write_json
from tests.helpers import crash

STR = "str"
SPEC_COLUMNS = {
    "scalars": {"step": pa.int64(), "epoch": pa.int32(), "probe": STR, "layer": STR, "metric": STR,
                "value": pa.float64()},
    "histograms": {"step": pa.int64(), "epoch": pa.int32(), "probe": STR, "layer": STR,
                   "source": STR, "edges": pa.list_(pa.float64()), "counts": pa.list_(pa.int64()),
                   "below": pa.int64(), "above": pa.int64()},
    "matrices": {"step": pa.int64(), "epoch": pa.int32(), "probe": STR, "name": STR, "row": STR,
                 "col": STR, "shape": pa.list_(pa.int32()), "values": pa.list_(pa.float64())},
    "layers": {"order": pa.int32(), "module": STR, "param": STR, "type": STR,
               "shape": pa.list_(pa.int32()), "numel": pa.int64()},
    "graph": {"source": STR, "target": STR},
}  # fmt: skip
RUN_KEYS = {
    "netprobe_version", "status", "started_at", "ended_at", "seed", "device", "torch_version",
    "git_sha", "model", "data", "init", "probes", "epochs_done", "steps_done", "best_val_acc",
    "final", "error", "probe_overhead", "stop_reason",
}  # fmt: skip


def check_schema(schema: pa.Schema, table: str) -> None:
    expected = SPEC_COLUMNS[table]
    assert schema.names == list(expected)
    for field in schema:
        want = expected[field.name]
        if want == STR:
            ok = pa.types.is_string(field.type) or (
                pa.types.is_dictionary(field.type) and pa.types.is_string(field.type.value_type)
            )
            assert ok, (table, field)
        else:
            assert field.type == want, (table, field)


def test_run_directory_matches_spec(tiny_run):
    run = tiny_run("model=cnn")
    for table in ("scalars",):
        parts = sorted((run.path / table).glob("part-*.parquet"))
        assert parts, table
        for part in parts:
            check_schema(pq.read_schema(part), table)
    for table in ("layers", "graph"):
        check_schema(pq.read_schema(run.path / f"{table}.parquet"), table)
    info = json.loads((run.path / "run.json").read_text())
    assert RUN_KEYS <= set(info)
    assert info["status"] == "completed" and info["error"] is None and info["stop_reason"] is None
    assert (run.path / ".hydra" / "config.yaml").exists()
    assert 0 <= info["probe_overhead"] < 1
    assert set(info["final"]) >= {"loss", "acc", "val_loss", "val_acc"}
    train = run.scalars(probe="train")
    assert {"loss", "acc", "lr", "grad_l2_total", "samples_per_s", "val_loss", "val_acc"} <= set(
        train["metric"]
    )
    assert train["step"].min() == 0 and train["epoch"].min() == 0


def test_layers_table_lists_every_parameter(tiny_run):
    run = tiny_run("model=cnn")
    layers = run.layers()
    params = layers[layers["param"] != ""]
    from netprobe.models.cnn import CNN

    model = CNN(3, 10, 8)
    expected = {n: list(p.shape) for n, p in model.named_parameters()}
    got = {
        f"{m}.{p}": list(s) for m, p, s in zip(params["module"], params["param"], params["shape"])
    }
    assert got == expected
    # Forward order: the first conv runs first, the last linear last.
    first, last = layers.sort_values("order").iloc[[0, -1]]["module"]
    assert (first, last) == ("features.0", "classifier.3")
    edges = set(zip(run.graph()["source"], run.graph()["target"]))
    assert ("features.0", "features.1") in edges


def test_histogram_and_matrix_tables_match_spec(tmp_path):
    import torch

    from netprobe.probes import StepState
    from netprobe.recorder import Recorder

    rec = Recorder(StepState(step=3, epoch=1))
    rec.histogram(
        "p", "a.weight", "weight", torch.linspace(-1, 1, 5), torch.tensor([1, 2, 3, 4]), 5, 6
    )
    rec.matrix("p", "m", "a", "b", torch.ones(2, 3))
    writer = RunWriter(tmp_path, {}, lock=claim_run_dir(tmp_path))
    for name, table in rec.drain().items():
        writer.append(name, table)
    writer.close("completed")
    for table in ("histograms", "matrices"):
        check_schema(pq.read_schema(tmp_path / table / "part-000000.parquet"), table)
    run = netprobe.load(tmp_path)
    h = run.histograms().iloc[0]
    assert list(h["counts"]) == [1, 2, 3, 4] and (h["below"], h["above"]) == (5, 6)
    m = run.matrices().iloc[0]
    assert list(m["shape"]) == [2, 3] and len(m["values"]) == 6 and m["step"] == 3


def test_parts_are_numbered_and_load_runs_finds_runs(tmp_path):
    for name in ("a", "b"):
        path = tmp_path / "sweep" / name
        writer = RunWriter(path, {"seed": 0}, lock=claim_run_dir(path))
        for step in range(3):
            block = ScalarBlock(step, 0, "train", [""], ["loss"], [[float(step)]])
            writer.append("scalars", scalar_table([block]))
        writer.close("completed")
    runs = netprobe.load_runs(tmp_path / "sweep")
    assert [r.path.name for r in runs] == ["a", "b"]
    assert sorted(p.name for p in (runs[0].path / "scalars").iterdir()) == [
        "part-000000.parquet",
        "part-000001.parquet",
        "part-000002.parquet",
    ]
    assert runs[0].scalars(metric="loss")["value"].tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(FileNotFoundError):
        netprobe.load(tmp_path)


def test_recorded_scalars_keep_their_order_and_values(tmp_path):
    """Blocks that repeat a (probe, layers, metrics) shape share codes; rows stay in block order."""
    import numpy as np
    import torch

    from netprobe.probes import StepState
    from netprobe.recorder import Recorder

    progress = StepState()
    rec = Recorder(progress)
    expected = []
    rows = np.arange(9.0).reshape(3, 3)  # host rows, as the CPU curve and fused kernels write
    for step in range(3):
        progress.step = step
        grads = torch.arange(6, dtype=torch.float32).reshape(3, 2) + 10 * step
        rec.scalars("gradients", ["a", "b", "c"], ["l1", "l2"], grads)
        for (layer, metric), value in zip(
            [(layer, m) for layer in "abc" for m in ("l1", "l2")], grads.reshape(-1).tolist()
        ):
            expected.append((step, "gradients", layer, metric, value))
        rec.scalars("train", [""], ["lr"], 0.5 * step)  # a Python number among tensors
        expected.append((step, "train", "", "lr", 0.5 * step))
        rec.scalars("train", [""], ["loss", "acc"], rows[step : step + 1, ::2])  # a strided view
        expected += [(step, "train", "", m, rows[step, c]) for m, c in (("loss", 0), ("acc", 2))]
        rec.scalars("gradients", ["a", "c"], ["l1", "l2"], torch.ones(2, 2, dtype=torch.float64))
        expected += [(step, "gradients", layer, m, 1.0) for layer in "ac" for m in ("l1", "l2")]
    writer = RunWriter(tmp_path, {}, lock=claim_run_dir(tmp_path))
    writer.append("scalars", rec.drain()["scalars"])
    df = netprobe.load(tmp_path).scalars()
    got = list(zip(df["step"], df["probe"], df["layer"], df["metric"], df["value"]))
    assert got == expected
    assert np.all(df["epoch"] == 0)
    with pytest.raises(ValueError, match="values for"):
        scalar_table([ScalarBlock(0, 0, "p", ["a"], ["m"], [[1.0]])], values=np.zeros(2))


def test_reading_sees_new_parts_and_skips_damaged_ones(tmp_path):
    writer = RunWriter(tmp_path, {}, lock=claim_run_dir(tmp_path))
    for step in range(2):
        block = ScalarBlock(step, 0, "train", [""], ["loss"], [[float(step)]])
        writer.append("scalars", scalar_table([block]))
    run = netprobe.load(tmp_path)
    assert run.scalars(metric="loss")["value"].tolist() == [0.0, 1.0]
    writer.append("scalars", scalar_table([ScalarBlock(2, 0, "train", [""], ["loss"], [[2.0]])]))
    assert run.scalars(metric="loss")["value"].tolist() == [0.0, 1.0, 2.0]
    (tmp_path / "scalars" / "part-000001.parquet").write_bytes(b"not parquet")
    with pytest.warns(UserWarning, match="part-000001"):
        assert run.scalars()["value"].tolist() == [0.0, 2.0]


def test_duration_is_the_time_spent_training_without_the_gap_before_a_resume(tmp_path, monkeypatch):
    """run.json's `duration_s`: each process's time, to 0.1 s and beyond, summed over resumes;
    the hours between an interruption and its resume are not training. `ls` and index.html show
    it; a run.json from before the field still gives start to end."""
    from types import SimpleNamespace

    from netprobe.listing import list_runs
    from netprobe.plots.page import duration
    from netprobe.store import writer as writer_module

    clock = [100.0]
    monkeypatch.setattr(writer_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    path = tmp_path / "run"
    writer = RunWriter(path, {"seed": 0}, lock=claim_run_dir(path))
    clock[0] += 1.34
    writer.close("interrupted")
    info = json.loads((path / "run.json").read_text())
    assert info["duration_s"] == pytest.approx(1.34)
    # Resumed an hour later.
    info["ended_at"] = "2026-01-01T12:00:00+00:00"
    (path / "run.json").write_text(json.dumps(info))
    clock[0] += 3600
    writer = RunWriter(path, {"seed": 0}, lock=claim_run_dir(path, resume=True), resume=True)
    clock[0] += 4.66
    writer.close("completed")
    info = json.loads((path / "run.json").read_text())
    assert info["duration_s"] == pytest.approx(6.0)
    assert duration(info) == "6.0 s"
    out = io.StringIO()
    list_runs([path], columns=["duration"], fmt="csv", out=out)
    assert out.getvalue().splitlines()[1].split(",")[0] == "6.0"
    old = {
        **info,
        "started_at": "2026-01-01T12:00:00+00:00",
        "ended_at": "2026-01-01T12:01:05+00:00",
    }
    del old["duration_s"]
    assert duration(old) == "65.0 s"


def test_runs_under_lists_each_run_once_however_the_paths_overlap(tmp_path):
    for name in ("a", "b"):
        (tmp_path / "sweep" / name).mkdir(parents=True)
        write_json(tmp_path / "sweep" / name / "run.json", {"status": "completed"})
    (tmp_path / "link").symlink_to(tmp_path / "sweep" / "a")
    sweep = tmp_path / "sweep"
    paths = [sweep / "b", sweep, sweep / "b", tmp_path / "link", f"{sweep}/./a"]
    assert runs_under(paths) == [sweep / "b", sweep / "a"]
    with pytest.raises(ConfigError, match="no such file or directory: .*nowhere"):
        runs_under([sweep, tmp_path / "nowhere"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no runs"):
        runs_under([tmp_path / "empty"])


def test_runs_are_found_in_the_order_of_their_job_numbers(tmp_path) -> None:
    """A sweep's jobs come as Hydra numbered them, 0, 1, 2, ..., 10, 11: not 0, 1, 10, 11, 2."""
    for job in range(12):
        (tmp_path / "sweep" / str(job)).mkdir(parents=True)
        (tmp_path / "sweep" / str(job) / "run.json").write_text("{}")
    found = runs_under([tmp_path / "sweep"])
    assert [p.name for p in found] == [str(job) for job in range(12)]


def test_a_folder_of_damaged_runs_says_so_once_skipped(tmp_path):
    from netprobe.store import read_runs_under

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "run.json").write_text('{"status": "comp')  # cut short
    with pytest.warns(UserWarning, match="skipping run") as caught:
        with pytest.raises(ConfigError) as refused:
            read_runs_under([tmp_path])
    assert len(caught) == 2
    assert str(refused.value) == (
        f"no readable runs under {tmp_path}: 2 found, each with a damaged run.json (skipped above)"
    )


def test_results_of_a_run_that_never_closed_are_its_last_recorded_values(tiny_run):
    """A killed run's results are the last values its scalars hold, marked as not final, with
    the epochs behind them; run.json's `final` stays as the run wrote it (empty)."""
    run = tiny_run("trainer.epochs=2")
    closed = run.results()
    assert closed.final and closed.values == run.info["final"] and closed.epochs == 2
    killed = crash(run.path)
    assert killed.status == "crashed" and killed.info["final"] == {}
    results = killed.results()
    assert not results.final and results.epochs == 2
    curves = killed.scalars(probe="train")
    for metric in ("loss", "acc", "val_loss", "val_acc"):
        assert results.values[metric] == curves[curves["metric"] == metric]["value"].iloc[-1]
