"""TensorBoard event files, live (`trainer.tensorboard=true`) and exported, read back with
TensorBoard's own reader and compared value for value with the stored Parquet rows."""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from tensorboard.backend.event_processing import plugin_event_accumulator
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.summary.writer import record_writer
from tensorboard.util import tensor_util

import netprobe
from netprobe import monitor
from netprobe.cli import main as cli
from netprobe.errors import StorageError
from netprobe.tensorboard import EventWriter
from tests.helpers import fail_writes, train_steps

PROBES = "probes=[gradients,weights,activations]"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, train_tiny) -> Path:
    """Two tiny runs that differ only by seed, each with live TensorBoard output."""
    root = tmp_path_factory.mktemp("tb") / "sweep"
    for seed in (0, 1):
        train_tiny(root / f"job{seed}", PROBES, "trainer.tensorboard=true", f"seed={seed}")
    return root


def read_events(logdir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def tb_scalars(acc: EventAccumulator) -> list[tuple[str, int, float]]:
    tags = [t for t in acc.Tags()["scalars"] if not t.startswith("final/")]
    return sorted((t, e.step, e.value) for t in tags for e in acc.Scalars(t))


def served_scalars(logdir: Path) -> list[tuple[str, int, float]]:
    """The scalars as TensorBoard's server reads them (its own accumulator, which takes the
    first session start it reads as the run's start and only later ones as restarts)."""
    acc = plugin_event_accumulator.EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    acc.Reload()
    tags = acc.PluginTagToContent("scalars")
    return sorted(
        (t, e.step, tensor_util.make_ndarray(e.tensor_proto).item())
        for t in tags
        if not t.startswith("final/")
        for e in acc.Tensors(t)
    )


def parquet_scalars(run: netprobe.Run) -> list[tuple[str, int, float]]:
    df = run.scalars()
    tags = [
        f"{p}/{m}/{lay}" if lay else f"{p}/{m}"
        for p, m, lay in zip(df["probe"], df["metric"], df["layer"])
    ]
    # TensorBoard keeps scalars as float32.
    return sorted(zip(tags, df["step"].tolist(), np.float32(df["value"]).tolist()))


def tb_histograms(acc: EventAccumulator) -> dict[tuple[str, int], tuple[list, list]]:
    return {
        (t, e.step): (list(e.histogram_value.bucket_limit), list(e.histogram_value.bucket))
        for t in acc.Tags()["histograms"]
        for e in acc.Histograms(t)
    }


def parquet_histograms(run: netprobe.Run) -> dict[tuple[str, int], tuple[list, list]]:
    """Right bin edges and counts; out-of-range counts as one more bin-wide bin at that end."""
    expected = {}
    for h in run.histograms().itertuples():
        edges, counts = list(h.edges), [int(c) for c in h.counts]
        width = (edges[-1] - edges[0]) / len(counts)
        limits = edges[1:]
        if h.below:
            limits, counts = [edges[0], *limits], [h.below, *counts]
        if h.above:
            limits, counts = [*limits, edges[-1] + width], [*counts, h.above]
        expected[(f"{h.probe}/{h.source}/{h.layer}", h.step)] = (limits, counts)
    return expected


def assert_events_match(logdir: Path, run: netprobe.Run) -> EventAccumulator:
    acc = read_events(logdir)
    assert tb_scalars(acc) == parquet_scalars(run)
    hists = parquet_histograms(run)
    assert len(hists) == len(run.histograms()) > 0
    got = tb_histograms(acc)
    assert got.keys() == hists.keys()
    for key, (limits, counts) in hists.items():
        assert got[key][1] == counts, key
        np.testing.assert_allclose(got[key][0], limits, rtol=1e-12)
    return acc


def test_live_event_files_hold_every_stored_scalar_and_histogram(sweep):
    for job in sorted(sweep.iterdir()):
        run = netprobe.load(job)
        acc = assert_events_match(job / "tb", run)
        assert {"train/loss", "train/val_acc", "gradients/l2/net.1.weight"} <= set(
            acc.Tags()["scalars"]
        )
        assert "weights/weight/net.1.weight" in acc.Tags()["histograms"]
        assert "activations/train/net.1" in acc.Tags()["histograms"]
        final = acc.Scalars("final/best_val_acc")
        assert [e.value for e in final] == [np.float32(run.info["best_val_acc"])]
        assert final[0].step == run.info["steps_done"]


def test_live_hparams_hold_the_flattened_config(sweep):
    run = netprobe.load(sweep / "job1")
    content = read_events(run.path / "tb").PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]
    ).session_start_info
    config = run.config
    assert start.hparams["seed"].number_value == config["seed"] == 1
    assert start.hparams["optim.lr"].number_value == config["optim"]["lr"]
    assert start.hparams["model.name"].string_value == config["model"]["name"]
    assert start.hparams["data.augment"].bool_value is config["data"]["augment"]
    # Interpolations resolved: the model's input size is the data's.
    assert start.hparams["model.image_size"].number_value == config["data"]["image_size"]
    end = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_end_info"])
    assert end.session_end_info.status == 1  # STATUS_SUCCESS


def test_a_resumed_run_shows_each_step_once(tmp_path, train_tiny):
    """The steps a resumed run trains again replace the events its first process wrote of
    them (flushed before it stopped); the captures of the epoch it resumes after stay."""
    run_dir = tmp_path / "run"
    # 7 steps an epoch, a flush every 3: steps 7-8 reach the events before the stop at step 9.
    extra = [
        PROBES,
        "trainer.tensorboard=true",
        "trainer.flush_every=3",
        "trainer.checkpoint_every=1",
    ]
    train_tiny(run_dir, *extra, "trainer.max_steps=9")
    assert {s for _, s, _ in tb_scalars(read_events(run_dir / "tb"))} >= {7, 8}
    # Resumed twice from the same checkpoint: the second resume stops at step 12, past a flush.
    train_tiny(run_dir, *extra, "trainer.resume=true", "trainer.max_steps=12")
    assert served_scalars(run_dir / "tb") == parquet_scalars(netprobe.load(run_dir))
    train_tiny(run_dir, *extra, "trainer.resume=true")
    run = netprobe.load(run_dir)
    assert run.info["steps_done"] == 14 and len(run.info["resumed_at"]) == 2
    acc = assert_events_match(run_dir / "tb", run)  # every stored row once, and nothing else
    assert served_scalars(run_dir / "tb") == parquet_scalars(run)  # as the server shows them
    val = [(e.step, e.value) for e in acc.Scalars("train/val_acc")]
    assert [s for s, _ in val] == [7, 14]  # the first epoch's, written before the stop, kept


def test_events_turned_on_at_a_resume_hold_every_stored_row(tmp_path, train_tiny):
    """A run trained without events and resumed with them: TensorBoard shows it all, as the
    Parquet files hold it, not only the steps from the resume on."""
    run_dir = tmp_path / "run"
    extra = [PROBES, "trainer.checkpoint_every=1"]
    train_tiny(run_dir, *extra, "trainer.max_steps=9")
    train_tiny(run_dir, *extra, "trainer.resume=true", "trainer.tensorboard=true")
    run = netprobe.load(run_dir)
    assert run.info["steps_done"] == 14
    assert_events_match(run_dir / "tb", run)
    assert served_scalars(run_dir / "tb") == parquet_scalars(run)


def test_events_turned_off_and_on_again_hold_every_stored_row_once(tmp_path, train_tiny):
    """Events on, then a resume without them (steps 7-13 reach no event file), then one with
    them again: those steps are written from the store, and the dropped ones are gone."""
    run_dir = tmp_path / "run"
    extra = [PROBES, "trainer.checkpoint_every=1", "trainer.flush_every=3"]
    train_tiny(run_dir, *extra, "trainer.tensorboard=true", "trainer.max_steps=9")
    train_tiny(run_dir, *extra, "trainer.resume=true", "trainer.epochs=3", "trainer.max_steps=16")
    train_tiny(
        run_dir, *extra, "trainer.resume=true", "trainer.epochs=3", "trainer.tensorboard=true"
    )
    run = netprobe.load(run_dir)
    assert run.info["steps_done"] == 21 and len(run.info["resumed_at"]) == 2
    assert_events_match(run_dir / "tb", run)
    assert served_scalars(run_dir / "tb") == parquet_scalars(run)


def test_a_run_resumed_after_an_interrupt_ends_as_its_last_process(tmp_path):
    """TensorBoard's server keeps the first session end it reads: the interrupted process
    writes none, and the hparams show how the resumed process ended."""
    for status in ("interrupted", "completed"):
        writer = EventWriter(tmp_path, hparams={"seed": 0})
        writer.restart(0, lambda step: {})
        writer.close({"status": status})
    acc = plugin_event_accumulator.EventAccumulator(str(tmp_path))
    content = acc.Reload().PluginTagToContent("hparams")["_hparams_/session_end_info"]
    end = plugin_data_pb2.HParamsPluginData.FromString(content).session_end_info
    assert end.status == 1  # STATUS_SUCCESS


def live_run(path: Path) -> tuple[netprobe.Monitor, Callable[[int], None]]:
    """A tiny model's run in `path` with live events in path/tb, and what takes n steps of it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 3))
    x, y = torch.randn(8, 3, 2, 2), torch.randint(0, 3, (8,))
    sink = EventWriter(path / "tb")
    mon = netprobe.attach(model, path, probes=["gradients"], probe_batch=(x, y), sink=sink)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return mon, lambda n: train_steps(mon, model, opt, [(x, y)] * n)


def test_events_are_on_disk_at_each_flush(tmp_path):
    """A run that crashes after a flush leaves readable events for everything flushed."""
    mon, step = live_run(tmp_path)
    assert not (tmp_path / "tb").exists()  # nothing before the first flush
    step(3)
    mon.flush()
    live = read_events(tmp_path / "tb")
    assert tb_scalars(live) == parquet_scalars(netprobe.load(tmp_path))
    assert {step for _, step, _ in tb_scalars(live)} == {0, 1, 2}
    mon.close()


def test_rows_whose_parquet_write_failed_still_reach_the_events(tmp_path, monkeypatch):
    """A flush whose scalars part fails (a full disk) keeps the rows for the next flush; the
    events get them at once, and once only."""
    mon, step = live_run(tmp_path)
    step(2)
    fail_writes(monkeypatch, "scalars")
    with pytest.raises(StorageError, match="ENOSPC"):
        mon.flush()
    assert {step for _, step, _ in tb_scalars(read_events(tmp_path / "tb"))} == {0, 1}
    monkeypatch.undo()  # room again: the kept rows are written with the next step's
    step(1)
    mon.close()
    assert tb_scalars(read_events(tmp_path / "tb")) == parquet_scalars(netprobe.load(tmp_path))


def test_when_the_sink_fails_too_the_writers_failure_is_raised(tmp_path, monkeypatch):
    mon, step = live_run(tmp_path)
    step(1)
    fail_writes(monkeypatch, "scalars")

    def broken(tables, wall_time=None):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(mon.sink, "write", broken)
    with pytest.raises(StorageError, match="ENOSPC") as raised:
        mon.flush()
    notes = raised.value.__notes__
    assert any("the sink failed too" in n and "Input/output error" in n for n in notes)
    monkeypatch.undo()
    mon.close()
    assert len(netprobe.load(tmp_path).scalars(probe="train", metric="loss")) == 1


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_full_disk_under_live_events_fails_the_run_in_one_line(
    tmp_path, monkeypatch, capsys, train_tiny
):
    """The disk fills after the first flush, for the event file too: the run ends `failed`,
    exit 1, with the store's one line, no traceback (from a writer thread or from the events'
    closing write), and the events hold what was written before."""
    parts = fail_writes(monkeypatch, "scalars", after=1)
    real = record_writer.RecordWriter.write

    def write(self, data):
        if len(parts) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(record_writer.RecordWriter, "write", write)
    run_dir = tmp_path / "run"
    tiny = ["data=synthetic", "data.num_samples=128", "data.image_size=8", "data.batch_size=32",
            "data.probe_size=32", "trainer.epochs=1", "trainer.flush_every=2"]  # fmt: skip
    code = cli(["train", *tiny, PROBES, "trainer.tensorboard=true", f"hydra.run.dir={run_dir}"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and "Exception" not in err, err
    assert f"netprobe: run {run_dir} failed: cannot write {run_dir}/scalars/part-" in err
    run = netprobe.load(run_dir)
    assert run.info["status"] == "failed" and "ENOSPC" in run.info["error"]
    monkeypatch.undo()
    assert tb_scalars(read_events(run_dir / "tb"))  # the first flush's


def test_a_table_whose_sink_write_fails_is_not_sent_again(tmp_path, monkeypatch):
    """At most once: a sink write that fails midway (here after writing its events) is not
    repeated at the next flush, so no event is doubled."""
    mon, step = live_run(tmp_path)
    step(2)
    real, calls = EventWriter.write, []

    def fails_after_writing(self, tables, wall_time=None):
        real(self, tables, wall_time)
        calls.append(1)
        if len(calls) == 1:
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(EventWriter, "write", fails_after_writing)
    with pytest.raises(OSError, match="Input/output error"):
        mon.flush()
    step(1)
    mon.close()
    assert tb_scalars(read_events(tmp_path / "tb")) == parquet_scalars(netprobe.load(tmp_path))


def test_a_signal_before_the_sink_writes_leaves_its_rows_for_the_next_flush(tmp_path, monkeypatch):
    """Ctrl-C is let through once the rows are written, before the sink's write (a slow sink
    must not hold it back); the rows the sink had not got reach it at the run's last flush."""
    mon, step = live_run(tmp_path)
    step(2)
    held = monitor.signals_held

    @contextlib.contextmanager
    def then_interrupted():
        with held():
            yield
        raise KeyboardInterrupt  # a signal held meanwhile, delivered as the block ends

    monkeypatch.setattr(monitor, "signals_held", then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        mon.flush()
    assert not (tmp_path / "tb").exists()  # the sink has not written yet
    monkeypatch.undo()
    step(1)
    mon.close()
    assert tb_scalars(read_events(tmp_path / "tb")) == parquet_scalars(netprobe.load(tmp_path))


def test_export_names_jobs_by_what_differs_and_matches_the_store(sweep, tmp_path, capsys):
    out = tmp_path / "tb"
    assert cli(["export", str(sweep), "--to", "tensorboard", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["seed=0", "seed=1"]
    for seed in (0, 1):
        assert_events_match(out / f"seed={seed}", netprobe.load(sweep / f"job{seed}"))
    before = sorted(out.rglob("*"))
    # A second export into the same folder would mix two copies: refused, nothing written.
    capsys.readouterr()
    assert cli(["export", str(sweep), "--to", "tensorboard", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds TensorBoard event files" in err[0]
    assert sorted(out.rglob("*")) == before


def test_export_of_one_run_and_of_damaged_parts(sweep, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(sweep / "job0", run, ignore=shutil.ignore_patterns("tb"))
    part = sorted((run / "scalars").glob("part-*.parquet"))[1]
    part.write_bytes(part.read_bytes()[:100])
    capsys.readouterr()
    assert cli(["export", str(run), "--to", "tensorboard", "--out", str(tmp_path / "tb")]) == 0
    err = capsys.readouterr().err
    assert f"netprobe: warning: skipping unreadable part file {part}" in err
    with pytest.warns(UserWarning):
        stored = netprobe.load(run)
        assert_events_match(tmp_path / "tb" / "run", stored)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--to", "wandb", "--out", "x"], "--to 'wandb' is not valid; valid: tensorboard"),
        (["--to", "tensorboard"], "the following arguments are required: --out"),
    ],
)
def test_bad_export_arguments_are_one_line_exit_2(sweep, tmp_path, capsys, args, message):
    capsys.readouterr()
    args = [str(tmp_path / "x") if a == "x" else a for a in args]
    assert cli(["export", str(sweep), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "x").exists()


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize(
    "where, message",
    [
        ("job0/tb", "inside the run directory"),  # the run's own live event files
        ("job0/export", "inside the run directory"),
        ("earlier", "already holds TensorBoard event files"),
        ("/proc/nope", "cannot create the folder"),
    ],
)
def test_an_out_that_export_must_not_write_is_refused(sweep, tmp_path, capsys, where, message):
    earlier = tmp_path / "earlier"
    assert cli(["export", str(sweep / "job1"), "--to", "tensorboard", "--out", str(earlier)]) == 0
    out = where if where.startswith("/") else str(sweep / where if "job" in where else earlier)
    before, exported = snapshot(sweep), snapshot(earlier)
    capsys.readouterr()
    assert cli(["export", str(sweep), "--to", "tensorboard", "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and out in err[0] and "--out" in err[0], err
    assert snapshot(sweep) == before and snapshot(earlier) == exported


def test_export_of_a_missing_path_is_one_line_exit_2(tmp_path, capsys):
    code = cli(["export", str(tmp_path / "nope"), "--to", "tensorboard", "--out", str(tmp_path)])
    assert code == 2
    assert "no such file or directory" in capsys.readouterr().err


def test_without_tensorboard_installed_it_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    import sys

    for name in [m for m in sys.modules if m == "tensorboard" or m.startswith("tensorboard.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` fails
    args = ["export", str(tmp_path), "--to", "tensorboard", "--out", str(tmp_path / "tb")]
    assert cli(args) == 2
    run_dir = tmp_path / "run"
    assert cli(["train", "trainer.tensorboard=true", f"hydra.run.dir={run_dir}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["netprobe: TensorBoard output needs tensorboard: pip install tensorboard"] * 2
    assert list(tmp_path.iterdir()) == []
