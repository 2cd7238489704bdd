"""Runs stopped by Ctrl-C, SIGTERM, SIGHUP or kill -9 keep what they wrote; one writer per run
folder."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn as nn

import netprobe
from netprobe.errors import ConfigError
from netprobe.lifecycle import (
    LOCK_FILE,
    RunLock,
    StopSignals,
    check_new_run_dir,
    claim_run_dir,
    effective_status,
    process_alive,
    status_for,
)
from netprobe.listing import list_runs
from netprobe.plots import plot
from netprobe.store import RunWriter
from tests.helpers import train_steps

# Long enough to be stopped mid-run, small enough that each step takes milliseconds.
ENDLESS = [
    "data=synthetic", "data.num_samples=128", "data.image_size=8", "data.batch_size=32",
    "data.probe_size=32", "trainer.epochs=100000", "trainer.flush_every=1",
]  # fmt: skip


def start_run(run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "netprobe", "train", *ENDLESS, *extra, f"hydra.run.dir={run_dir}"],
        cwd=run_dir.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def wait_for_parts(proc: subprocess.Popen, run_dir: Path, n: int = 1) -> None:
    """Until `n` scalars part files exist (the loop is running), without sleeping long."""
    deadline = time.monotonic() + 120
    while len(list((run_dir / "scalars").glob("part-*.parquet"))) < n:
        if proc.poll() is not None:
            pytest.fail(f"run ended early ({proc.returncode}): {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no part file within 120 s")
        time.sleep(0.05)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signal_flushes_and_marks_interrupted(tmp_path, sig):
    run_dir = tmp_path / "run"
    proc = start_run(run_dir)
    wait_for_parts(proc, run_dir)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    run = netprobe.load(run_dir)
    assert run.info["status"] == "interrupted" and run.status == "interrupted"
    assert run.info["ended_at"] is not None
    losses = run.scalars(probe="train", metric="loss")
    # Everything recorded up to the signal was flushed: one loss per step done, and the loss of
    # a step the signal cut short between backward and update.
    done = run.info["steps_done"]
    assert done >= 1 and len(losses) in (done, done + 1)
    assert losses["step"].tolist() == list(range(len(losses)))
    assert not (run_dir / LOCK_FILE).exists()


# A probe whose start capture (before the first step) gets SIGTERM, as a scheduler may send it.
TERM_AT_START = """
import os, signal, sys
from netprobe.cli import main
from netprobe.probes import PROBES, Option, Probe, Schedule

class TermAtStart(Probe):
    name = "term_at_start"
    default_schedule = Schedule(at=("start",))
    options = (Option("x", int, None, nullable=True),)

    def capture(self, state):
        os.kill(os.getpid(), signal.SIGTERM)

PROBES["term_at_start"] = TermAtStart
sys.exit(main(sys.argv[1:]))
"""


def test_a_signal_during_the_start_captures_marks_interrupted(tmp_path):
    """The run holds its folder and writes run.json before its start captures: a SIGTERM
    there ends it `interrupted` (130, the lock released), not killed with run.json `running`."""
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            TERM_AT_START,
            "train",
            *ENDLESS,
            "+probes.term_at_start.x=1",
            f"hydra.run.dir={run_dir}",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 130, proc.stderr
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "interrupted" and info["steps_done"] == 0
    assert not (run_dir / LOCK_FILE).exists()


def test_kill_9_leaves_readable_parts_listed_as_crashed(tmp_path):
    run_dir = tmp_path / "run"
    proc = start_run(run_dir)
    wait_for_parts(proc, run_dir, n=3)
    proc.kill()
    proc.communicate(timeout=60)

    parts = sorted(run_dir.glob("*/part-*.parquet"))
    assert len(parts) >= 3
    for part in parts:
        pq.read_table(part)  # every part written is whole
    run = netprobe.load(run_dir)
    assert run.info["status"] == "running" and run.status == "crashed"
    assert not run.scalars(probe="train", metric="loss").empty

    out = io.StringIO()
    list_runs([tmp_path], out=out)
    assert "crashed" in out.getvalue()

    written = plot([run_dir], out=tmp_path / "figs", only=["training_curves"])
    assert written and written[0].stat().st_size > 5000

    # The folder still holds that run: a new run is refused, whatever its stale lock says.
    with pytest.raises(ConfigError, match="already holds a run.*crashed.*resume"):
        check_new_run_dir(run_dir)


def test_second_run_into_the_same_folder_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    # The first run: a process that holds the folder as a run does (lock, run.json), idle so the
    # second one starts fast on a busy machine.
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_RUN_DIR, str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        second = subprocess.run(
            [sys.executable, "-m", "netprobe", "train", *ENDLESS, f"hydra.run.dir={run_dir}"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in second.stderr
        assert str(run_dir) in lines[0] and "in use" in lines[0] and str(holder.pid) in lines[0]
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE, "run.json"]
    finally:
        holder.kill()
        holder.wait()


HOLD_RUN_DIR = """
import sys, time
from netprobe.lifecycle import claim_run_dir
from netprobe.store import RunWriter
writer = RunWriter(sys.argv[1], {"seed": 0}, lock=claim_run_dir(sys.argv[1]))
print("ready", flush=True)
time.sleep(120)
"""


def test_runs_that_pass_preflight_together_still_refuse(tmp_path, capsys):
    """Both started before either wrote run.json: the lock decides, the loser exits 2."""
    from netprobe.app import hydra_main

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with RunLock(run_dir):  # held by this process, as by a run that won the race
        code = hydra_main([*ENDLESS, "trainer.epochs=1", f"hydra.run.dir={run_dir}"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "in use" in err[0]
    assert not (run_dir / "run.json").exists()


def test_lock_refuses_a_second_writer_in_process(tmp_path):
    writer = RunWriter(tmp_path, {"seed": 0}, lock=claim_run_dir(tmp_path))
    with pytest.raises(ConfigError, match=f"in use by another netprobe run \\(pid {os.getpid()}"):
        claim_run_dir(tmp_path)
    with pytest.raises(ConfigError, match="in use"):
        claim_run_dir(tmp_path, resume=True)
    assert json.loads((tmp_path / "run.json").read_text())["seed"] == 0
    writer.close("completed")
    assert not (tmp_path / LOCK_FILE).exists()
    with pytest.raises(ConfigError, match="already holds a run \\(status completed\\)"):
        claim_run_dir(tmp_path)
    assert not (tmp_path / LOCK_FILE).exists()  # a refused claim lets the lock go
    # Resuming is the one way back into a finished run's folder.
    lock = claim_run_dir(tmp_path, resume=True)
    RunWriter(tmp_path, {"seed": 0}, lock=lock, resume=True).close("completed")
    assert not lock.held and not (tmp_path / LOCK_FILE).exists()


def test_a_writer_needs_its_folders_lock_held(tmp_path):
    """The lock is taken before the writer exists (the monitor claims the folder), and handed to
    it: a lock not held, or another folder's, is no lock at all."""
    with pytest.raises(ValueError, match="needs that directory's lock"):
        RunWriter(tmp_path, {}, lock=RunLock(tmp_path))
    other = claim_run_dir(tmp_path / "other")
    with pytest.raises(ValueError, match="needs that directory's lock"):
        RunWriter(tmp_path, {}, lock=other)
    assert other.held and list(tmp_path.iterdir()) == [tmp_path / "other"]
    other.release()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": dead_pid(), "host": os.uname()[1]}))
    check_new_run_dir(tmp_path)
    with RunLock(tmp_path) as lock:
        assert json.loads(lock.path.read_text().splitlines()[0])["pid"] == os.getpid()
    assert not (tmp_path / LOCK_FILE).exists()


def test_live_or_unreadable_lock_is_respected(tmp_path):
    (tmp_path / LOCK_FILE).write_text("")  # a holder we cannot identify
    with pytest.raises(ConfigError, match="in use"):
        RunLock(tmp_path).acquire()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": other.pid, "host": os.uname()[1]}))
        with pytest.raises(ConfigError, match=f"pid {other.pid}"):
            check_new_run_dir(tmp_path)
    finally:
        other.kill()
        other.wait()


def test_effective_status_tells_crashed_from_running():
    host = os.uname()[1]
    now = netprobe.store.now_iso()
    alive = {"status": "running", "pid": os.getpid(), "host": host, "started_at": now}
    assert effective_status(alive) == "running"
    assert effective_status({**alive, "pid": dead_pid()}) == "crashed"
    # Another host's process cannot be checked from here: it stays running.
    assert effective_status({**alive, "pid": dead_pid(), "host": "elsewhere"}) == "running"
    assert effective_status({**alive, "status": "completed", "pid": dead_pid()}) == "completed"
    # A pid now held by a process younger than the run is not the run's process.
    assert not process_alive(os.getpid(), host, "2000-01-01T00:00:00+00:00")


def test_second_signal_exits_at_once(monkeypatch):
    exits = []

    def fake_exit(code: int) -> None:
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", fake_exit)
    with StopSignals() as stop:
        assert signal.getsignal(signal.SIGTERM) == stop.handle
        with pytest.raises(KeyboardInterrupt):
            stop.handle(signal.SIGINT, None)
        assert exits == []
        with pytest.raises(SystemExit):
            stop.handle(signal.SIGINT, None)  # while the first is still being handled
        assert exits == [130]
    assert signal.getsignal(signal.SIGTERM) != stop.handle


def test_status_for_how_a_run_ended():
    assert status_for(None, None) == ("completed", None)
    assert status_for(KeyboardInterrupt, KeyboardInterrupt("SIGTERM")) == (
        "interrupted",
        "interrupted",
    )
    error = ValueError("bad batch")
    assert status_for(ValueError, error) == ("failed", "ValueError: bad batch")


@pytest.fixture
def python_sigint():
    """Python's own Ctrl-C handler meanwhile: a suite a shell started in the background inherits
    SIGINT ignored, and no KeyboardInterrupt comes of that."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.mark.parametrize("handlers", ["python's", "netprobe train's"])
def test_a_stop_signal_during_a_flush_waits_for_its_rows(
    tmp_path, monkeypatch, handlers, python_sigint
):
    """With another thread alive (a data loader's), a signal sent while a flush holds what it
    drained reaches that thread, and Python runs the handler in the main thread all the same:
    the flush notes it and acts on it once the rows are on disk."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    mon = netprobe.attach(model, tmp_path / "run", probes=["gradients"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train_steps(mon, model, opt, [(torch.randn(8, 4), torch.randint(0, 3, (8,)))] * 3)
    drain = mon.record.drain

    def drain_then_signal():
        tables = drain()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)  # the handler's turn, inside the flush
        return tables

    monkeypatch.setattr(mon.record, "drain", drain_then_signal)
    done = threading.Event()
    loader = threading.Thread(target=done.wait, daemon=True)
    loader.start()
    stops = StopSignals() if handlers != "python's" else contextlib.nullcontext()
    try:
        with stops, pytest.raises(KeyboardInterrupt):
            mon.flush()
    finally:
        done.set()
    monkeypatch.undo()
    mon.close("interrupted")
    run = netprobe.load(tmp_path / "run")
    assert run.scalars(probe="train", metric="loss")["step"].tolist() == [0, 1, 2]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_signal_while_a_file_is_written_exits_at_once():
    """Signals wait while a file is written whole, but a run's Ctrl-C is said at once and a
    second one quits at once (130), as the run's own handler promises."""
    code = (
        "import signal, sys\n"
        "from netprobe.lifecycle import StopSignals, signals_held\n"
        "with StopSignals(), signals_held():\n"
        "    signal.raise_signal(signal.SIGINT)\n"
        "    print('held once', file=sys.stderr, flush=True)\n"
        "    signal.raise_signal(signal.SIGINT)\n"
        "    print('not reached', file=sys.stderr, flush=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line]
    assert lines == [
        "netprobe: SIGINT: stopping once the file being written is whole (press Ctrl-C again to "
        "quit at once)",
        "held once",
        "netprobe: SIGINT again: exiting now",
    ]
