"""DDP under torchrun (netprobe/distributed.py): two gloo processes on the CPU record what one
process records over the same global batches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import netprobe
from netprobe.config import compose
from netprobe.data import IndexBatches
from netprobe.errors import ConfigError
from netprobe.train import train

# 80 samples: 64 to train in global batches of 32 (16 per rank), 2 steps per epoch.
SETUP = ["model=cnn", "model.width=4", "model.hidden=16", "data=synthetic",
         "data.num_samples=80", "data.image_size=8", "data.batch_size=32", "data.probe_size=16",
         "trainer.epochs=2", "probes=[gradients]", "trainer.device=cpu"]  # fmt: skip
ROOT = Path(__file__).resolve().parents[1]


def test_two_ranks_split_each_batch_evenly():
    shares = []
    for rank in (0, 1):
        sampler = IndexBatches(70, 32, True, False, torch.Generator().manual_seed(5), rank, 2)
        shares.append(list(sampler))
    whole = list(IndexBatches(70, 32, True, False, torch.Generator().manual_seed(5)))
    # Batches of 32, 32 and 6: each rank gets 16, 16 and 3 of them, together the whole batch.
    assert [len(b) for b in shares[0]] == [16, 16, 3] and len(shares[1]) == 3
    for a, b, w in zip(*shares, whole):
        assert torch.equal(torch.cat([a, b]), w)
    # A last batch smaller than the number of ranks is dropped on every rank alike.
    assert len(IndexBatches(65, 32, True, False, torch.Generator(), 1, 2)) == 2
    with pytest.raises(ConfigError, match="multiple of the 2 processes"):
        IndexBatches(70, 33, True, False, torch.Generator(), 0, 2)


def assert_same_records(ddp: netprobe.Run, single: netprobe.Run) -> None:
    """The gradient metrics and training curves of both runs, step by step, within 1e-5."""
    keys = ["step", "epoch", "probe", "layer", "metric"]
    for probe in ("gradients", "train"):
        a = ddp.scalars(probe=probe).sort_values(keys).reset_index(drop=True)
        b = single.scalars(probe=probe).sort_values(keys).reset_index(drop=True)
        a, b = a[a["metric"] != "samples_per_s"], b[b["metric"] != "samples_per_s"]
        assert len(a) == len(b) > 0 and (a[keys].to_numpy() == b[keys].to_numpy()).all()
        if probe == "gradients":
            assert a["step"].max() == 3 and a["layer"].nunique() == 6
        rel = np.abs(a["value"].to_numpy() - b["value"].to_numpy()) / np.maximum(
            np.abs(b["value"].to_numpy()), 1e-12
        )
        assert rel.max() <= 1e-5, a.assign(rel=rel).sort_values("rel").tail()


def worker_env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def test_torchrun_gloo_matches_one_process(tmp_path: Path):
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "netprobe", "train", *SETUP, f"hydra.run.dir={ddp_dir}"]  # fmt: skip
    res = subprocess.run(
        command, cwd=tmp_path, env=worker_env(), capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    train(compose(SETUP), single_dir)

    ddp, single = netprobe.load(ddp_dir), netprobe.load(single_dir)
    assert ddp.info["status"] == "completed" and ddp.info["world_size"] == 2
    # Only rank 0 wrote: one run directory, nothing from the other rank's Hydra beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "single"]
    assert_same_records(ddp, single)


@pytest.mark.slow
def test_submitit_job_with_two_tasks_trains_with_ddp(tmp_path: Path):
    """`hydra.launcher.tasks_per_node=2` (SLURM or local): one DDP run per job."""
    sweep, single_dir = tmp_path / "sweep", tmp_path / "single"
    command = [sys.executable, "-m", "netprobe", "train", "-m", "hydra/launcher=submitit_local",
               "hydra.launcher.tasks_per_node=2", *SETUP, f"hydra.sweep.dir={sweep}"]  # fmt: skip
    res = subprocess.run(
        command, cwd=tmp_path, env=worker_env(), capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    train(compose(SETUP), single_dir)
    ddp = netprobe.load(sweep / "0")
    assert ddp.info["status"] == "completed" and ddp.info["world_size"] == 2
    assert_same_records(ddp, netprobe.load(single_dir))


def test_the_loop_talks_to_either_monitor_through_the_same_public_names(tmp_path: Path):
    """Every `mon.NAME` train.py uses is public and exists on both `Monitor` (rank 0) and
    `FollowerMonitor` (the other ranks), which has no writer to fake."""
    import ast

    import torch.nn as nn

    from netprobe import train as train_module
    from netprobe.distributed import FollowerMonitor

    tree = ast.parse(Path(train_module.__file__).read_text())
    used = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "mon"
    }
    assert {"stop", "status", "after_backward", "end_epoch"} <= used
    assert not any(name.startswith("_") for name in used)
    follower = FollowerMonitor()
    with netprobe.attach(nn.Linear(2, 2), tmp_path, probes=[]) as mon:
        for name in used:
            assert hasattr(mon, name) and hasattr(follower, name), name
    assert not hasattr(follower, "writer")


def test_stop_and_status(tmp_path: Path):
    import torch.nn as nn

    from netprobe.distributed import FollowerMonitor

    with netprobe.attach(nn.Linear(2, 2), tmp_path, probes=[]) as mon:
        assert mon.status == "running"
        mon.stop("enough")
    assert mon.status == "completed"
    info = netprobe.load(tmp_path).info
    assert (info["status"], info["stop_reason"]) == ("completed", "enough")
    follower = FollowerMonitor()
    with pytest.raises(KeyboardInterrupt), follower:
        follower.stop("enough")
        assert follower.status == "running"
        raise KeyboardInterrupt
    assert follower.status == "interrupted"
