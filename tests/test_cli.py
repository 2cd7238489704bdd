"""The `netprobe` command end to end, in subprocesses, as a user runs it."""

import os
import subprocess
import sys
from pathlib import Path

import netprobe
from tests.helpers import netprobe_cmd

TINY = ["data.num_samples=256", "data.image_size=8", "data.batch_size=32", "data.probe_size=32"]


def test_train_plot_ls_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    res = netprobe_cmd("train", "trainer.epochs=2", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert f"netprobe plot {run_dir}" in res.stderr
    assert netprobe.load(run_dir).info["status"] == "completed"

    res = netprobe_cmd("plot", str(run_dir), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    written = [Path(line) for line in res.stdout.splitlines()]
    assert run_dir / "figures" / "index.html" in written
    assert all(p.exists() and p.stat().st_size > 0 for p in written)

    res = netprobe_cmd("ls", str(tmp_path), cwd=tmp_path)
    assert res.returncode == 0 and "completed" in res.stdout and "digits" in res.stdout


def test_seed_sweep_is_aggregated(tmp_path):
    sweep = tmp_path / "sweep"
    res = netprobe_cmd(
        "train", "-m", "seed=0,1,2", "model=cnn", "data=synthetic", "trainer.epochs=2",
        *TINY, f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    runs = netprobe.load_runs(sweep)
    assert sorted(r.info["seed"] for r in runs) == [0, 1, 2]
    assert all(r.info["status"] == "completed" for r in runs)
    res = netprobe_cmd("plot", str(sweep), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "3 run(s) in 1 group(s)" in res.stderr
    assert (sweep / "figures" / "training_curves.png").stat().st_size > 5000


def test_unknown_model_is_one_line_exit_2(tmp_path):
    res = netprobe_cmd("train", "model=nope", cwd=tmp_path)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr
    assert "'nope'" in lines[0] and "mlp" in lines[0] and "resnet18" in lines[0]
    assert not (tmp_path / "outputs").exists()


def test_cfg_job_prints_config_without_training(tmp_path):
    res = netprobe_cmd("train", "model=cnn", "--cfg", "job", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "_target_: netprobe.models.cnn.CNN" in res.stdout
    assert not (tmp_path / "outputs").exists()


def test_plot_unknown_figure_and_empty_path(tmp_path):
    res = netprobe_cmd("plot", str(tmp_path), cwd=tmp_path)
    assert res.returncode == 2 and "no runs" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    res = netprobe_cmd("plot", str(tmp_path), "--only", "nope", cwd=tmp_path)
    assert res.returncode == 2 and "'nope'" in res.stderr and "training_curves" in res.stderr


def test_a_closed_stdout_ends_quietly():
    """`netprobe train --help | head`: the reader left before the text was written."""
    repo = Path(netprobe.__file__).resolve().parents[1]  # this checkout's netprobe, not another
    for args in (["train", "--help"], ["train", "--cfg", "job"], ["--help"]):
        read, write = os.pipe()
        os.close(read)  # a reader that is already gone
        res = subprocess.run(
            [sys.executable, "-m", "netprobe", *args],
            cwd=repo,
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
        os.close(write)
        assert res.returncode == 0 and res.stderr == "", (args, res.stderr)
