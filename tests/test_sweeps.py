"""Sweeps through Hydra's launcher plugins: jobs in other processes, one run directory each."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import netprobe
from netprobe.cli import main as cli
from netprobe.config import conf_dir
from netprobe.probes import PROBES, Option, Probe, Schedule, StepState

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=cnn", "model.width=4", "model.hidden=16", "data=synthetic", "data.num_samples=64",
        "data.image_size=8", "data.batch_size=16", "data.probe_size=16", "trainer.epochs=2",
        "trainer.max_steps=3"]  # fmt: skip


@pytest.fixture
def workers_import_netprobe(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Launcher workers are fresh interpreters: they find netprobe through PYTHONPATH."""
    path = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), path) if p))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path)


def complete_runs(sweep: Path, seeds: list[int]) -> list[netprobe.Run]:
    runs = netprobe.load_runs(sweep)
    assert sorted(r.info["seed"] for r in runs) == seeds
    for run in runs:
        assert run.info["status"] == "completed" and run.info["steps_done"] == 3
        assert run.path.parent == sweep and (run.path / ".hydra" / "config.yaml").exists()
        assert run.info["pid"] != os.getpid()  # trained in a worker process
        assert run.scalars(metric="loss")["step"].tolist() == [0, 1, 2]
    return runs


def test_joblib_sweep_over_three_seeds(workers_import_netprobe, tmp_path: Path, capsys):
    sweep = tmp_path / "sweep"
    args = ["train", "-m", "seed=0,1,2", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
            *TINY, f"hydra.sweep.dir={sweep}"]  # fmt: skip
    assert cli(args) == 0
    runs = complete_runs(sweep, [0, 1, 2])
    assert len({r.info["pid"] for r in runs}) > 1  # in parallel: more than one worker
    capsys.readouterr()
    assert cli(["plot", str(sweep)]) == 0
    assert "for 3 run(s) in 1 group(s)" in capsys.readouterr().err
    assert (sweep / "figures" / "training_curves.png").stat().st_size > 5000


def test_submitit_local_sweep_over_two_seeds(workers_import_netprobe, tmp_path: Path, capsys):
    sweep = tmp_path / "sweep"
    args = ["train", "-m", "seed=0,1", "hydra/launcher=submitit_local",
            "hydra.launcher.timeout_min=10", *TINY, f"hydra.sweep.dir={sweep}"]  # fmt: skip
    assert cli(args) == 0
    complete_runs(sweep, [0, 1])
    assert (sweep / ".submitit").is_dir()  # submitit's own logs, beside the runs
    capsys.readouterr()
    assert cli(["plot", str(sweep)]) == 0
    assert "for 2 run(s) in 1 group(s)" in capsys.readouterr().err


def test_a_job_refused_in_a_worker_is_exit_2(workers_import_netprobe, tmp_path: Path, capsys):
    """A refusal only the job itself can see comes back from the worker as exit 2 and one line:
    here a job folder that already holds a run, under a sweep.subdir preflight cannot resolve."""
    sweep = tmp_path / "sweep"
    (sweep / "s1").mkdir(parents=True)
    (sweep / "s1" / "run.json").write_text(json.dumps({"status": "completed", "seed": 1}))
    args = ["train", "-m", "seed=0,1", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *TINY,
            f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=s${seed}"]  # fmt: skip
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert f"netprobe: run directory {sweep / 's1'} already holds a run" in err
    assert "Traceback" not in err
    assert json.loads((sweep / "s0" / "run.json").read_text())["status"] == "completed"
    assert json.loads((sweep / "s1" / "run.json").read_text()) == {"status": "completed", "seed": 1}


def test_slurm_launcher_config():
    text = (conf_dir() / "hydra" / "launcher" / "slurm.yaml").read_text()
    assert text.startswith("# @package hydra.launcher")
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            cfg = compose(
                "config",
                ["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                return_hydra_config=True,
            )
    finally:
        GlobalHydra.instance().clear()
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert launcher["partition"] == "gpu" and launcher["gpus_per_node"] == 1
    assert launcher["timeout_min"] == 240 and launcher["tasks_per_node"] == 1
    assert launcher["submitit_folder"] == "${hydra.sweep.dir}/.submitit/%j"


def test_preflight_expands_a_presets_own_sweep(tmp_path: Path):
    """`-m experiment=init_test` runs seven jobs from the preset's hydra.sweeper.params: their
    folders are checked before Hydra writes into any (here job 3's holds a finished run)."""
    from netprobe.config import preflight
    from netprobe.errors import ConfigError

    sweep = tmp_path / "sweep"
    (sweep / "3").mkdir(parents=True)
    (sweep / "3" / "run.json").write_text(json.dumps({"status": "completed"}))
    args = ["-m", "experiment=init_test", *TINY, f"hydra.sweep.dir={sweep}"]
    with pytest.raises(ConfigError, match=f"{sweep / '3'} already holds a run"):
        preflight(args)
    preflight([*args, "init=orthogonal"])  # the command line wins: one job, folder 0


def test_preflight_numbers_jobs_as_hydra_does():
    """Job i's folder is checked against the i-th job's config: the combinations in the order
    of Hydra's basic sweeper (a preset's own sweep first, a key given again keeping its place)."""
    import itertools

    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from netprobe.config import _job_choices

    overrides = ["experiment=init_test", "seed=0,1", "optim.lr=0.1", "init=ones,zeros,orthogonal"]
    params = OmegaConf.load(conf_dir() / "experiment" / "init_test.yaml").hydra.sweeper.params
    hydra_order = [f"{k}={v}" for k, v in params.items()] + overrides
    (jobs,) = BasicSweeper.split_arguments(
        OverridesParser.create().parse_overrides(hydra_order), None
    )
    ours = [list(c) for c in itertools.product(*_job_choices(["-m", *overrides]))]
    assert len(ours) == 6 and ours == jobs


def test_a_sweep_of_no_value_is_refused(tmp_path: Path, capsys):
    """`seed=range(0,0)` sweeps nothing: one line and exit 2 (it was a traceback), no folder."""
    sweep = tmp_path / "sweep"
    assert cli(["train", "-m", "seed=range(0,0)", *TINY, f"hydra.sweep.dir={sweep}"]) == 2
    err = capsys.readouterr().err
    assert err == "netprobe: seed=range(0,0) sweeps no value: give it one at least\n"
    assert not sweep.exists()


def test_a_sweeps_closing_table_is_of_what_its_command_did(tmp_path: Path, capsys):
    """A sweep sent into a folder that holds another sweep's runs: refused before it writes
    anything (multirun.yaml included), in one line; sent again as it was, its jobs are left as
    they were, and the table says so, not "2 completed" of runs it did not train."""
    sweep = tmp_path / "sweep"
    first = ["train", "-m", "seed=0,1", *TINY, f"hydra.sweep.dir={sweep}"]
    assert cli(first) == 0
    capsys.readouterr()
    before = {p: p.read_bytes() for p in sorted(sweep.rglob("*")) if p.is_file()}
    assert cli([*first, "optim.lr=0.01", "trainer.resume=true"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"netprobe: trainer.resume=true refused: the run in {sweep / '0'}")
    assert len(err.splitlines()) == 1, err
    assert {p: p.read_bytes() for p in sorted(sweep.rglob("*")) if p.is_file()} == before
    assert cli([*first, "trainer.resume=true"]) == 0
    err = capsys.readouterr().err
    assert f"sweep {sweep}: 2 jobs, 0 completed, 2 left as they were (nothing to resume)" in err


@pytest.mark.parametrize("to_group", [False, True], ids=["kill -INT PID", "Ctrl-C"])
def test_a_stop_signal_to_a_joblib_sweep_ends_its_runs_interrupted(
    workers_import_netprobe, tmp_path: Path, to_group: bool
):
    """SIGINT to the sweep's own process alone (a scheduler's, a `kill -INT`): the workers' runs
    end `interrupted`, not killed with the launcher's workers and left `running` (crashed). So
    does Ctrl-C in the terminal, sent to the whole process group: passed on to the workers by the
    sweep's process, it must not reach them twice (a second signal exits at once)."""
    import signal
    import subprocess
    import sys
    import time

    sweep = tmp_path / "sweep"
    args = ["-m", "seed=0,1", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *TINY[:-2],
            "trainer.epochs=100000", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "netprobe", "train", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        # Started from a shell in the background, SIGINT would be ignored: put Python's back.
        # A process group of its own, as a terminal's foreground job has.
        preexec_fn=lambda: (os.setpgrp(), signal.signal(signal.SIGINT, signal.SIG_DFL)),
    )
    try:
        runs = [sweep / "0" / "run.json", sweep / "1" / "run.json"]
        while not all(r.exists() and json.loads(r.read_text())["steps_done"] for r in runs):
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.1)
        for run in runs:  # each worker in a group of its own: Ctrl-C reaches the sweep alone
            assert os.getpgid(json.loads(run.read_text())["pid"]) != proc.pid
        if to_group:
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    for run in runs:
        info = json.loads(run.read_text())
        assert info["status"] == "interrupted", (run, info["status"], err)
        assert not (run.parent / ".netprobe.lock").exists()


class CtrlC(Probe):
    """Presses Ctrl-C at step `at_step` of the sweep's second job."""

    name = "ctrl_c"
    default_schedule = Schedule(every=1)
    options = (Option("at_step", int, None, nullable=True),)
    jobs = 0

    def start(self, state: StepState) -> None:
        CtrlC.jobs += 1

    def after_backward(self, state: StepState) -> None:
        if CtrlC.jobs == 2 and state.step == self.cfg["at_step"]:
            raise KeyboardInterrupt


def test_an_interrupted_sweep_still_closes_with_its_table(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setitem(PROBES, "ctrl_c", CtrlC)
    monkeypatch.setattr(CtrlC, "jobs", 0)
    sweep = tmp_path / "sweep"
    args = ["train", "-m", "seed=0,1,2", *TINY, "+probes.ctrl_c.at_step=1"]
    assert cli([*args, f"hydra.sweep.dir={sweep}"]) == 130
    err = capsys.readouterr().err
    assert f"sweep {sweep}: 2 jobs, 1 completed, 1 interrupted" in err, err
    assert err.rstrip().endswith("netprobe: interrupted")
    assert not (sweep / "2").exists()  # the third job never started
    monkeypatch.setattr(CtrlC, "jobs", 1)  # its first job is the one stopped
    assert cli([*args, f"hydra.sweep.dir={tmp_path / 'one'}"]) == 130
    assert f"sweep {tmp_path / 'one'}: 1 job, 0 completed, 1 interrupted" in capsys.readouterr().err


def test_a_job_stopped_before_it_started_is_no_damaged_run(tmp_path: Path, capsys, monkeypatch):
    """Ctrl-C while a sweep's second job loads its data, before it takes its folder: its row
    says it was stopped, not that a run there is damaged."""
    import netprobe.setup

    loads = []

    def ctrl_c_at_second(*args, **kwargs):
        loads.append(1)
        if len(loads) == 2:
            raise KeyboardInterrupt
        return build_data(*args, **kwargs)

    build_data = netprobe.setup.build_data
    monkeypatch.setattr(netprobe.setup, "build_data", ctrl_c_at_second)
    sweep = tmp_path / "sweep"
    assert cli(["train", "-m", "seed=0,1", *TINY, f"hydra.sweep.dir={sweep}"]) == 130
    err = capsys.readouterr().err
    assert f"sweep {sweep}: 2 jobs, 1 completed, 1 interrupted" in err, err
    row = next(line for line in err.splitlines() if line.startswith("│ 1 "))
    assert "interrupted" in row and "stopped before it started" in row, err
