"""A run directory is never silently wrong: a refused command leaves it byte for byte, resuming is
a contract checked before anything is touched, every ending (an interrupt in the end captures, a
failed write, a full disk) is honest and keeps what was recorded."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn as nn

import netprobe
from netprobe import checkpoint, store
from netprobe.cli import main as cli
from netprobe.config import compose
from netprobe.errors import ConfigError, StorageError
from netprobe.lifecycle import LOCK_FILE, RESERVE, claim_run_dir
from netprobe.probes import PROBES, Option, Probe, Schedule, StepState
from netprobe.store import writer as store_writer
from netprobe.train import train
from tests.helpers import fail_writes, train_steps

# 103 training samples in batches of 32: 4 steps an epoch.
TINY = ["data=synthetic", "data.num_samples=128", "data.image_size=8", "data.batch_size=32",
        "data.probe_size=32", "model=cnn", "model.width=4", "model.hidden=16",
        "trainer.flush_every=2"]  # fmt: skip
CHECKPOINTED = [*TINY, "trainer.epochs=2", "trainer.checkpoint_every=1",
                "probes=[gradients,weights]"]  # fmt: skip


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder beneath `folder`: a file's SHA-256, "/" for a folder."""
    return {
        str(p.relative_to(folder)): "/"
        if p.is_dir()
        else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
    }


def refused(args: list[str], capsys: pytest.CaptureFixture, *words: str) -> str:
    """Run the command line; it must exit 2 with one line holding `words`."""
    code = cli(args)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if ".tmp-" in p.name or ".stale-" in p.name]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of two epochs with checkpoints, made through the command line as users make it."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert cli(["train", *CHECKPOINTED, f"hydra.run.dir={run_dir}"]) == 0
    return run_dir


@pytest.fixture
def run_copy(finished: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "run"))


# ---------------------------------------------------------------- what is a run


@pytest.mark.parametrize("resume", [False, True])
def test_run_files_without_run_json_are_never_written_into(run_copy, capsys, resume):
    (run_copy / "run.json").unlink()
    before = snapshot(run_copy)
    extra = ["trainer.resume=true"] if resume else []
    args = ["train", *CHECKPOINTED, *extra, f"hydra.run.dir={run_copy}"]
    refused(args, capsys, str(run_copy), "no run.json", "scalars", "not a run")
    assert snapshot(run_copy) == before
    # Past the command line's checks (a library call, a launcher's job) the run refuses alike.
    with pytest.raises(ConfigError, match="no run.json"):
        train(compose([*CHECKPOINTED, *extra]), run_copy)
    assert snapshot(run_copy) == before


def test_hydra_writes_nothing_before_the_run_holds_its_folder(tmp_path, capsys):
    """A start refused inside the run (its folder taken meanwhile) leaves no .hydra/ behind."""
    from netprobe.app import hydra_main
    from netprobe.lifecycle import RunLock

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with RunLock(run_dir):
        assert hydra_main([*TINY, "trainer.epochs=1", f"hydra.run.dir={run_dir}"]) == 2
    assert "in use" in capsys.readouterr().err
    assert list(run_dir.iterdir()) == []


RACE_WORKER = textwrap.dedent(
    """
    import sys
    from netprobe.cli import main
    print("ready", flush=True)
    for line in sys.stdin:
        run_dir, seed = line.split()
        code = main(["train", *sys.argv[1:], f"seed={seed}", f"hydra.run.dir={run_dir}"])
        print(code, flush=True)
    """
)


def test_two_runs_started_into_one_folder_at_once(tmp_path):
    """Ten races between two processes started together into one new folder: one trains, the
    other exits 2, and the folder's config, run.json and overrides are all the winner's."""
    args = [*TINY, "trainer.epochs=1", "probes=none"]
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", RACE_WORKER, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for _ in range(2)
    ]
    try:
        for worker in workers:
            assert worker.stdout.readline().strip() == "ready"
        for attempt in range(10):
            run_dir = tmp_path / f"run{attempt}"
            for seed, worker in zip((1, 2), workers):
                worker.stdin.write(f"{run_dir} {seed}\n")
                worker.stdin.flush()
            codes = [int(worker.stdout.readline()) for worker in workers]
            assert sorted(codes) == [0, 2], codes
            winner = 1 + codes.index(0)
            run = netprobe.load(run_dir)
            assert run.info["seed"] == winner and run.info["status"] == "completed"
            assert run.config["seed"] == winner
            overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()
            assert f"seed={winner}" in overrides and f"seed={3 - winner}" not in overrides
            assert not (run_dir / LOCK_FILE).exists()
    finally:
        for worker in workers:
            worker.stdin.close()
            worker.wait(timeout=60)


def test_a_stale_lock_replaced_meanwhile_by_a_live_one_is_put_back(tmp_path):
    """Taking over a stale lock renames it away first; if what was moved turns out to be a live
    lock that replaced the stale one after it was judged, it goes back in place."""
    from netprobe.lifecycle import RunLock

    live = {"pid": os.getpid(), "host": os.uname()[1], "since": 1.0}
    (tmp_path / LOCK_FILE).write_text(json.dumps(live))
    RunLock(tmp_path)._take_over({"pid": 999_999_999, "host": os.uname()[1]})
    assert json.loads((tmp_path / LOCK_FILE).read_text()) == live
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]
    # The stale one itself is removed, whoever else tries the same.
    stale = {"pid": 999_999_999, "host": os.uname()[1]}
    (tmp_path / LOCK_FILE).write_text(json.dumps(stale))
    RunLock(tmp_path)._take_over(stale)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- resuming is a contract

RESUME_REFUSALS = {
    "seed": (["seed=1"], ["seed=0 (the run's) vs 1"]),
    "model": (["model.hidden=32"], ["model.hidden=16 (the run's) vs 32"]),
    "optim": (["optim=sgd"], ["optim.name=adam (the run's) vs sgd", "optim.momentum"]),
    "lr": (["optim.lr=0.5"], ["optim.lr=0.001 (the run's) vs 0.5"]),
    "init": (["init=orthogonal"], ["init.name=default (the run's) vs orthogonal"]),
    "probes": (["probes=[gradients]"], ["probes.weights=(set) (the run's) vs (absent)"]),
    "precision": (["trainer.precision=bf16"], ["trainer.precision=32 (the run's) vs bf16"]),
    "batch size": (["data.batch_size=16"], ["data.batch_size=32 (the run's) vs 16"]),
    "data": (["data.num_samples=256"], ["data.num_samples=128 (the run's) vs 256"]),
    "fewer epochs": (["trainer.epochs=1"], ["trainer.epochs=1 is fewer than the run's 2"]),
}


@pytest.mark.parametrize("case", RESUME_REFUSALS)
def test_resume_that_changes_the_rows_meaning_is_refused(run_copy, capsys, case):
    overrides, words = RESUME_REFUSALS[case]
    before = snapshot(run_copy)
    args = ["train", *CHECKPOINTED, *overrides, "trainer.resume=true", f"hydra.run.dir={run_copy}"]
    refused(args, capsys, "trainer.resume=true refused", str(run_copy), *words)
    assert snapshot(run_copy) == before
    if case == "seed":  # the run's own check, past the command line's
        with pytest.raises(ConfigError, match="seed=0 \\(the run's\\) vs 1"):
            train(compose([*CHECKPOINTED, *overrides, "trainer.resume=true"]), run_copy)
        assert snapshot(run_copy) == before


def test_resume_accepts_more_epochs_logging_and_device(run_copy):
    more = [
        "trainer.epochs=3",
        "trainer.log_every=2",
        "trainer.flush_every=3",
        "trainer.device=cpu",
    ]
    args = ["train", *CHECKPOINTED, *more, "trainer.resume=true", f"hydra.run.dir={run_copy}"]
    assert cli(args) == 0
    run = netprobe.load(run_copy)
    assert run.info["status"] == "completed" and run.info["epochs_done"] == 3
    assert run.scalars(probe="train", metric="loss")["step"].tolist() == list(range(12))
    assert run.config["trainer"]["epochs"] == 3  # the config says what the run now is
    assert no_temp_files(run_copy)


def test_a_finished_run_trained_longer_equals_a_longer_run(tmp_path):
    """Its end captures (here `channels`, taken at the end) give way to those of the new end."""
    setup = [*TINY, "trainer.checkpoint_every=1", "probes=[gradients,channels]"]
    train(compose([*setup, "trainer.epochs=1"]), tmp_path / "resumed")
    assert netprobe.load(tmp_path / "resumed").scalars(probe="channels")["step"].unique() == [4]
    train(compose([*setup, "trainer.epochs=2", "trainer.resume=true"]), tmp_path / "resumed")
    train(compose([*setup, "trainer.epochs=2"]), tmp_path / "longer")
    resumed = stored(tmp_path / "resumed")
    assert resumed == stored(tmp_path / "longer")
    assert netprobe.load(tmp_path / "resumed").scalars(probe="channels")["step"].unique() == [8]


DAMAGE = {
    "empty last.pt": ("checkpoints/last.pt", lambda b: b""),
    "truncated last.pt": ("checkpoints/last.pt", lambda b: b[: len(b) // 2]),
    "zero-byte part": ("scalars/part-000000.parquet", lambda b: b""),
    "damaged run.json": ("run.json", lambda b: b[:20]),
    "damaged config": (".hydra/config.yaml", lambda b: b"model: [unclosed"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_files_refuse_resume_in_one_line(run_copy, capsys, case):
    name, damage = DAMAGE[case]
    path = run_copy / name
    path.write_bytes(damage(path.read_bytes()))
    before = snapshot(run_copy)
    args = ["train", *CHECKPOINTED, "trainer.resume=true", f"hydra.run.dir={run_copy}"]
    refused(args, capsys, name.split("/")[-1], "damaged")
    assert snapshot(run_copy) == before


# ---------------------------------------------------------------- every ending is honest


class EndTrouble(Probe):
    """Its end capture raises what `raise` names, after recording a value."""

    name = "end_trouble"
    default_schedule = Schedule(at=("end",))
    options = (Option("raise", str, "interrupt", choices=("interrupt", "error")),)

    def capture(self, state: StepState) -> None:
        self.ctx.record.scalars(self.name, [""], ["at_end"], 1.0)
        if self.cfg["raise"] == "interrupt":
            raise KeyboardInterrupt
        raise RuntimeError("the end capture broke")


@pytest.mark.parametrize("trouble", ["interrupt", "error"])
def test_trouble_in_the_end_captures_still_flushes(tmp_path, monkeypatch, trouble):
    monkeypatch.setitem(PROBES, "end_trouble", EndTrouble)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    x, y = torch.randn(8, 1, 4, 4), torch.arange(8) % 4
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probes = {"gradients": {}, "end_trouble": {"raise": trouble}}
    expected = KeyboardInterrupt if trouble == "interrupt" else RuntimeError
    with pytest.raises(expected):
        # flush_every is larger than the run: every row is still in memory at the end.
        with netprobe.attach(model, tmp_path / "run", probes, (x, y), flush_every=100) as mon:
            train_steps(mon, model, opt, [(x, y)] * 5)
    run = netprobe.load(tmp_path / "run")
    status = "interrupted" if trouble == "interrupt" else "failed"
    assert run.info["status"] == status and run.info["steps_done"] == 5
    if trouble == "error":
        assert "the end capture broke" in run.info["error"]
    assert run.scalars(probe="train", metric="loss")["step"].tolist() == list(range(5))
    assert run.scalars(probe="gradients", metric="l2")["step"].nunique() == 5
    assert len(run.scalars(probe="end_trouble")) == 1  # recorded before the trouble
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_a_table_that_fails_keeps_its_rows_and_the_others_are_written(tmp_path, monkeypatch):
    lock = claim_run_dir(tmp_path / "run")
    writer = store.RunWriter(tmp_path / "run", {"seed": 0}, lock=lock)
    scalars = store.scalar_table([(0, 0, "train", [""], ["loss"], [1.5])])
    hists = store.rows_table(
        "histograms",
        [{"step": 0, "epoch": 0, "probe": "weights", "layer": "w", "source": "weight",
          "edges": [0.0, 1.0], "counts": [3], "below": 0, "above": 0}],
    )  # fmt: skip
    fail_writes(monkeypatch, "histograms")
    with pytest.raises(StorageError, match="cannot write .*histograms/part-000000.parquet.*ENOSPC"):
        writer.append_all({"histograms": hists, "scalars": scalars})
    assert netprobe.load(tmp_path / "run").scalars()["value"].tolist() == [1.5]
    assert writer.first_unwritten_step() == 0
    assert no_temp_files(tmp_path / "run")
    monkeypatch.undo()  # the disk has room again: the kept rows go first, then the new ones
    writer.append_all({"histograms": hists})
    assert len(netprobe.load(tmp_path / "run").histograms()) == 2
    assert writer.first_unwritten_step() is None
    writer.close("completed")


def test_a_full_disk_fails_the_run_in_one_line(tmp_path, monkeypatch, capsys):
    """An injected ENOSPC from the third scalars part on: failed, exit 1, one line naming the
    file and the error; run.json true about the steps; no temporary file; the lock gone."""
    calls = fail_writes(monkeypatch, "scalars", after=2)
    run_dir = tmp_path / "run"
    code = cli(["train", *CHECKPOINTED, f"hydra.run.dir={run_dir}"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err
    line = next(ln for ln in err.splitlines() if ln.startswith("netprobe: run"))
    assert f"cannot write {calls[2].replace('.part-', 'part-').split('.tmp-')[0]}" in line
    assert "No space left on device (ENOSPC)" in line
    run = netprobe.load(run_dir)
    assert run.info["status"] == "failed"
    assert (
        "ENOSPC" in run.info["error"] and "from step 4 on could not be written" in run.info["error"]
    )
    # flush_every=2: parts at steps 2 and 4; the epoch's end (at step 4, validation) failed.
    assert run.info["steps_done"] == 4
    assert run.scalars(probe="train", metric="loss")["step"].tolist() == list(range(4))
    assert no_temp_files(run_dir) and not (run_dir / LOCK_FILE).exists()


def test_a_disk_full_to_the_last_byte_still_ends_the_run_failed(tmp_path, monkeypatch, capsys):
    """From the third part on the disk has no byte left, for run.json too (its rewrite at the
    flush fails first): only the room the lock file keeps, once cut, takes the closing run.json,
    which says `failed` instead of staying `running`."""
    parts = fail_writes(monkeypatch, "part-", after=2)
    run_dir = tmp_path / "run"
    lock, real = run_dir / LOCK_FILE, store_writer.write_json

    def write_json(path, data):
        if len(parts) > 2 and lock.stat().st_size >= RESERVE:  # full, the reserve still held
            raise StorageError(path, OSError(errno.ENOSPC, "No space left on device"))
        return real(path, data)

    monkeypatch.setattr(store_writer, "write_json", write_json)
    assert cli(["train", *CHECKPOINTED, f"hydra.run.dir={run_dir}"]) == 1
    assert "ENOSPC" in capsys.readouterr().err
    info = netprobe.load(run_dir).info
    assert info["status"] == "failed" and "ENOSPC" in info["error"], info
    assert not lock.exists() and no_temp_files(run_dir)


def test_the_lock_keeps_room_where_the_disk_has_it(tmp_path, monkeypatch):
    lock = claim_run_dir(tmp_path / "run")
    assert lock.path.stat().st_size == RESERVE
    holder, padding = lock.path.read_text().split("\n")
    assert json.loads(holder)["pid"] == os.getpid()
    # Random text, which a compressing filesystem cannot shrink to nothing, as it would blanks.
    assert len(set(padding)) > 32 and len(zlib.compress(padding.encode())) > RESERVE / 2
    assert lock.free_reserve() and lock.path.stat().st_size < 100 and not lock.free_reserve()
    lock.release()
    real = Path.write_text

    def no_room_for_padding(self, text, *args, **kwargs):
        if len(text) >= RESERVE:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", no_room_for_padding)
    lock = claim_run_dir(tmp_path / "run")  # a nearly full disk: the lock, without its room
    assert lock.path.stat().st_size < 100 and not lock.free_reserve()
    lock.release()


def test_a_disk_without_room_for_the_lock_fails_in_one_line(tmp_path, monkeypatch, capsys):
    """Not even the lock's text fits: exit 1, one line naming the lock file, no traceback, and
    no private file of the lock left behind in the run's folder."""
    real = Path.write_text

    def full(self, text, *args, **kwargs):
        if self.name.startswith(LOCK_FILE):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    run_dir = tmp_path / "run"
    assert cli(["train", *TINY, f"hydra.run.dir={run_dir}"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert f"failed: cannot write {run_dir / LOCK_FILE}: No space left on device (ENOSPC)" in err
    assert list(run_dir.iterdir()) == []


@pytest.mark.parametrize("masked", [False, True])
def test_a_checkpoint_that_cannot_be_written_fails_the_run(tmp_path, monkeypatch, capsys, masked):
    """`masked`: as torch.save does on a full disk, the ENOSPC is the context of a RuntimeError
    its zip writer raises while closing."""

    def save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        finally:
            if masked:
                # torch.save raises its own error, the interrupt only its context
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")  # noqa: B904

    monkeypatch.setattr(checkpoint.torch, "save", save)
    run_dir = tmp_path / "run"
    assert cli(["train", *CHECKPOINTED, f"hydra.run.dir={run_dir}"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"cannot write {run_dir / 'checkpoints' / 'start.pt'}" in err and "ENOSPC" in err
    run = netprobe.load(run_dir)
    assert run.info["status"] == "failed" and "start.pt" in run.info["error"]
    assert no_temp_files(run_dir) and not (run_dir / "checkpoints" / "start.pt").exists()


def test_ctrl_c_while_a_checkpoint_is_written_waits_for_it(tmp_path, monkeypatch, capsys):
    """Ctrl-C arrives while an epoch's checkpoint is written: that file and the epoch's other
    one are finished first, then the run stops `interrupted` (exit 130) and resumes from them.
    torch.save, cut short, would raise a RuntimeError of its own that hid the interrupt."""
    real = checkpoint.torch.save
    pressed = []

    def save(obj, f, *args, **kwargs):
        if not pressed and any(name in f.name for name in ("last.pt", "epoch-0000.pt")):
            pressed.append(f.name)
            try:
                signal.raise_signal(signal.SIGINT)
            except BaseException as exc:  # torch.save's own error, hiding the interrupt
                raise RuntimeError("enforce fail at inline_container.cc:672") from exc
        real(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save)
    run_dir = tmp_path / "run"
    args = ["train", *CHECKPOINTED, f"hydra.run.dir={run_dir}"]
    assert cli(args) == 130
    assert pressed
    info = netprobe.load(run_dir).info
    assert info["status"] == "interrupted" and info["epochs_done"] == 1
    # The epoch's two checkpoints are written before the signal acts, whichever it met.
    for name in ("last.pt", "epoch-0000.pt"):
        assert checkpoint.load_checkpoint(run_dir / "checkpoints" / name)["epoch"] == 0
    assert no_temp_files(run_dir) and not (run_dir / LOCK_FILE).exists()
    capsys.readouterr()
    assert cli([*args, "trainer.resume=true"]) == 0
    assert netprobe.load(run_dir).info["status"] == "completed"


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_really_full_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=384k", "tmpfs", str(disk)])
    if mounted.returncode != 0:
        pytest.skip("this machine does not allow mounting a tmpfs")
    try:
        run_dir = disk / "run"
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "netprobe",
                "train",
                *CHECKPOINTED,
                "trainer.epochs=1000",
                "trainer.flush_every=1",
                f"hydra.run.dir={run_dir}",
            ],  # fmt: skip
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr
        assert "No space left on device (ENOSPC)" in proc.stderr
        assert no_temp_files(run_dir) and not (run_dir / LOCK_FILE).exists()
        for part in run_dir.glob("*/part-*.parquet"):
            pq.read_table(part)  # every part written is whole
        info = json.loads((run_dir / "run.json").read_text())
        assert info["status"] == "failed" and "ENOSPC" in info["error"]
        steps = netprobe.load(run_dir).scalars(probe="train", metric="loss")["step"].tolist()
        assert steps == list(range(len(steps))) and len(steps) <= info["steps_done"]
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_writes_are_fsynced_and_renamed(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    writer = store.RunWriter(tmp_path, {"seed": 0}, lock=claim_run_dir(tmp_path))
    part = writer.append("scalars", store.scalar_table([(0, 0, "train", [""], ["loss"], [1.0])]))
    tmp = f"{part.parent}/.{part.name}.tmp-{os.getpid()}"
    assert synced[-2:] == [tmp, str(part.parent)]  # the data before the rename, then the folder
    writer.close("completed")
    assert synced[-2:] == [f"{tmp_path}/.run.json.tmp-{os.getpid()}", str(tmp_path)]


# ---------------------------------------------------------------- kill -9 at random moments

KILLED = [*TINY, "trainer.epochs=3", "trainer.checkpoint_every=1", "trainer.flush_every=1",
          "probes=[gradients,weights,rwc]"]  # fmt: skip
# One process runs the commands that are not killed (the unbroken twin, each resume) with the
# same thread count as the killed ones, so that the values compare exactly.
WORKER = textwrap.dedent(
    """
    import json, sys
    from netprobe.cli import main
    for line in sys.stdin:
        print(main(json.loads(line)), flush=True)
    """
)
SINGLE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def stored(run_dir: Path) -> dict[str, list]:
    """Every stored row but the wall-clock ones, sorted, as plain values."""
    run = netprobe.load(run_dir)
    scalars = run.scalars()
    scalars = scalars[scalars["metric"] != "samples_per_s"]
    hists = run.histograms()
    hists = hists.assign(edges=hists["edges"].map(list), counts=hists["counts"].map(list))
    matrices = run.matrices()
    matrices = matrices.assign(values=matrices["values"].map(list))
    tables = {"scalars": scalars, "histograms": hists, "matrices": matrices}
    return {name: sorted(map(repr, table.to_dict("records"))) for name, table in tables.items()}


def kill_and_resume(tmp_path: Path, tries: int, seed: int) -> None:
    """`tries` runs killed with SIGKILL at random moments, each then resumed (or, killed before
    its first checkpoint, refused and started again): each ends equal to an unbroken run."""
    import random

    rng = random.Random(seed)
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True, env=SINGLE_THREAD,
    )  # fmt: skip

    def run(*args: str) -> int:
        worker.stdin.write(json.dumps(["train", *KILLED, *args]) + "\n")
        worker.stdin.flush()
        return int(worker.stdout.readline())

    try:
        assert run(f"hydra.run.dir={tmp_path / 'twin'}") == 0
        twin = stored(tmp_path / "twin")
        for attempt in range(tries):
            run_dir = tmp_path / f"run{attempt}"
            victim = subprocess.Popen(
                [sys.executable, "-m", "netprobe", "train", *KILLED, f"hydra.run.dir={run_dir}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=SINGLE_THREAD,
            )  # fmt: skip
            # A random point of its progress (parts written, 15 in all), then a random moment
            # within a few milliseconds: writing a part, a checkpoint, run.json, or between.
            parts, moment = rng.randint(0, 15), rng.uniform(0, 0.02)
            while len(list(run_dir.glob("scalars/part-*"))) < parts and victim.poll() is None:
                time.sleep(0.002)
            try:
                victim.wait(timeout=moment)
            except subprocess.TimeoutExpired:
                victim.kill()
                victim.wait()
            for part in run_dir.glob("*/part-*.parquet"):
                pq.read_table(part)  # every part written is whole
            before = snapshot(run_dir)
            code = run("trainer.resume=true", f"hydra.run.dir={run_dir}")
            if code == 2:  # killed before its first checkpoint: refused, the folder untouched
                assert not (run_dir / "checkpoints" / "last.pt").exists()
                assert snapshot(run_dir) == before
                shutil.rmtree(run_dir)
                code = run(f"hydra.run.dir={run_dir}")
            assert code == 0
            info = netprobe.load(run_dir).info
            assert info["status"] == "completed" and info["steps_done"] == 12
            losses = netprobe.load(run_dir).scalars(probe="train", metric="loss")
            assert losses["step"].tolist() == list(range(12))  # no hole, no duplicate
            assert stored(run_dir) == twin, f"attempt {attempt}, killed after {parts} parts"
            assert no_temp_files(run_dir) and not (run_dir / LOCK_FILE).exists()
    finally:
        worker.stdin.close()
        worker.wait(timeout=60)


def test_killed_at_random_moments_and_resumed_equals_an_unbroken_run(tmp_path):
    kill_and_resume(tmp_path, tries=2, seed=11)


@pytest.mark.slow
def test_killed_at_random_moments_many_times(tmp_path):
    kill_and_resume(tmp_path, tries=12, seed=12)
