"""Damaged results (a truncated or corrupt part file, a broken run.json) are skipped with a
warning that names them; everything else still loads, lists and plots."""

from __future__ import annotations

import io
import shutil

import pyarrow.parquet as pq
import pytest

import netprobe
from netprobe.cli import main as cli
from netprobe.listing import list_runs
from netprobe.plots import plot


@pytest.fixture
def damaged_run(tiny_run):
    """A finished run whose second scalars part is cut in half and third overwritten with junk."""
    run = tiny_run("trainer.epochs=1", "trainer.flush_every=2")
    parts = sorted((run.path / "scalars").glob("part-*.parquet"))
    assert len(parts) >= 4
    data = parts[1].read_bytes()
    parts[1].write_bytes(data[: len(data) // 2])
    parts[2].write_bytes(b"PAR1" + b"\x00junk" * 50)
    return run, parts


def test_damaged_parts_are_skipped_by_load_and_plot(damaged_run, tmp_path, capsys):
    run, parts = damaged_run
    good = [pq.read_table(p).num_rows for p in parts if p not in parts[1:3]]
    with pytest.warns(UserWarning) as caught:
        df = netprobe.load(run.path).scalars()
    messages = [str(w.message) for w in caught]
    assert any(str(parts[1]) in m for m in messages)
    assert any(str(parts[2]) in m for m in messages)
    assert len(df) == sum(good)

    capsys.readouterr()
    code = cli(["plot", str(run.path), "--out", str(tmp_path / "figs")])
    assert code == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if "warning" in line]
    assert any(str(parts[1]) in line for line in warnings), captured.err
    assert all(line.startswith("netprobe: warning: skipping") for line in warnings)
    assert (tmp_path / "figs" / "training_curves.png").stat().st_size > 5000
    assert (tmp_path / "figs" / "grad_norms.png").stat().st_size > 5000


def test_damaged_run_json_is_listed_as_damaged(tiny_run, tmp_path):
    good = tiny_run("trainer.epochs=1", "trainer.max_steps=2", "probes=none")
    broken, odd = (good.path.with_name(name) for name in ("broken", "odd"))
    for copy in (broken, odd):
        shutil.copytree(good.path, copy)
    (broken / "run.json").write_text('{"status": "compl')  # cut off mid-write
    (odd / "run.json").write_text("[1, 2]")  # JSON, but not a run's manifest

    out = io.StringIO()
    list_runs([good.path.parent], columns=["status", "path"], out=out)
    rows = out.getvalue().splitlines()
    status = {p: next(line.split()[1] for line in rows if f"{p} " in line)
              for p in (good.path, broken, odd)}  # fmt: skip
    assert status == {good.path: "completed", broken: "damaged", odd: "damaged"}

    with pytest.warns(UserWarning, match="damaged run.json"):
        runs = netprobe.load_runs(good.path.parent)
    assert [r.path for r in runs] == [good.path]
    with pytest.raises(ValueError):
        netprobe.load(broken)

    with pytest.warns(UserWarning) as caught:
        written = plot([good.path.parent], out=tmp_path / "figs", only=["training_curves"])
    assert written
    skipped = sorted(str(w.message).split(":")[0] for w in caught)
    assert skipped == [f"skipping run {broken}", f"skipping run {odd}"]
