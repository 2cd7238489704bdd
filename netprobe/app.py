"""The Hydra app behind `netprobe train`: runs each job, prints its closing summary, and closes a
sweep (`-m`) with one table of its jobs. Light to import: `netprobe train --help` loads no torch."""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from netprobe.errors import ConfigError, NothingToDo, StorageError

EXIT_CODES = {
    "completed": 0, "unchanged": 0, "failed": 1, "diverged": 1, "interrupted": 130, "refused": 2
}  # fmt: skip
# Hydra's flags that print something and run no job; and those that print the config instead.
INFO_FLAGS = {"--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion", "-sc"}
CONFIG_FLAGS = {"--cfg", "-c"}


class JobFailed(Exception):
    """A job that a launcher ran in another process ended with a non-zero exit code; Hydra
    carries it back to the sweep's own process, which exits with that code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)
        self.code = code

    def __str__(self) -> str:
        return str(self.args[1])


# The jobs this process runs itself: the worst exit code, whether any started, and how each ended
# (`ended`: run folder → its status, or `refused`/`unchanged`, and the line said). `pid` tells a
# job whether it runs here or in a launcher's worker, whose globals nobody reads. `sweep` is the
# directory of the sweep this process launched, if any (whatever launcher ran its jobs).
# `stops`: the sweep's WorkerStops while a launcher's workers run its jobs.
JOBS: dict[str, Any] = {
    "code": 0, "pid": None, "started": False, "sweep": None, "ended": {}, "stops": None
}  # fmt: skip


class SweepSummary(Callback):
    """Remembers, in the process that launches a sweep, where its jobs go (conf/config.yaml
    registers it), so that the sweep's summary can follow its last job."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        JOBS["sweep"] = Path(config.hydra.sweep.dir)
        if not str(config.hydra.launcher.get("_target_", "")).endswith(".BasicLauncher"):
            # Jobs in worker processes: a stop signal to this one reaches their runs first.
            from netprobe.lifecycle import WorkerStops

            JOBS["stops"] = WorkerStops(JOBS["sweep"]).__enter__()


def run_job(cfg: DictConfig) -> str:
    """One job: train into Hydra's output directory, then print the closing summary."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from netprobe import distributed, doctor
    from netprobe.progress import echo, summary
    from netprobe.train import train

    here = os.getpid() == JOBS["pid"]
    JOBS["started"] = JOBS["started"] or here
    if not here:
        from netprobe.lifecycle import leave_terminal_group

        leave_terminal_group()  # stop signals reach this worker from the sweep's process alone
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    status, said = "failed", ""
    before = run_file(run_dir)
    try:
        status = train(cfg, run_dir)
    except ConfigError as exc:
        status, said = "refused", str(exc)
        if not here:
            raise  # Hydra hands it back to the sweep's own process, which exits 2
        # Refused before writing (its folder in use, say): one line and exit 2, in sweeps too.
        print(f"netprobe: {exc}", file=sys.stderr)
    except NothingToDo as exc:
        status, said = "unchanged", str(exc)
        print(f"netprobe: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        status = "interrupted"
        if here:  # for the sweep's table, printed on the way out
            # Stopped before it took its folder, the job has no run there: whatever is, is not its.
            said = "" if run_file(run_dir) != before else "stopped before it started"
            JOBS["ended"][run_dir] = (status, said)
        raise
    except StorageError as exc:
        # A full disk or a folder gone read-only: the run is failed, in one line, no traceback.
        if not here:
            raise JobFailed(1, f"run {run_dir} failed: {exc}") from None
        print(f"netprobe: run {run_dir} failed: {exc}", file=sys.stderr)
    except Exception as exc:
        echo(traceback.format_exc().rstrip(), run_dir, show=False)  # printed on its way out
        if here:
            raise
        traceback.print_exc()  # into the worker's log
        raise JobFailed(1, f"run {run_dir} failed: {type(exc).__name__}: {exc}") from None
    finally:
        # A refused or finished run is left as it was: no summary in its train.log or run.json;
        # so is one this job did not write (stopped before it took the folder, say).
        shown = status not in ("refused", "unchanged") and distributed.launched().is_main
        if shown and run_file(run_dir) not in (None, before):
            findings = doctor.close_run(run_dir).rstrip("\n")  # keeps them in run.json too
            text = summary(run_dir, hint=False) + (f"\n{findings}" if findings else "")
            # In a sweep the plot command comes once, after the sweep's table.
            if hydra_cfg.mode != RunMode.MULTIRUN:
                text += f"\nnext: netprobe plot {run_dir}"
            echo(text, run_dir)
    code = EXIT_CODES.get(status, 1)
    if here:
        JOBS["code"] = max(JOBS["code"], code)
        JOBS["ended"][run_dir] = (status, said)
    elif code:
        raise JobFailed(code, f"run {run_dir} ended {status}")
    return status


def run_file(run_dir: Path) -> bytes | None:
    """The bytes of `run_dir`'s run.json, None without one: a job that writes the run changes
    them (its status, its times)."""
    try:
        return (run_dir / "run.json").read_bytes()
    except OSError:
        return None


def hydra_main(args: list[str]) -> int:
    """Run the Hydra app on `args` (what follows `netprobe train`); returns the exit code.

    Jobs run by a launcher in other processes (joblib, submitit) report a bad config or an
    unsuccessful run by raising, which Hydra hands back here; jobs run here record theirs in JOBS.
    """
    import hydra
    from hydra.errors import HydraException

    from netprobe.config import CONFIG_NAME, conf_dir, hydra_message
    from netprobe.errors import first_line

    app = hydra.main(config_path=str(conf_dir()), config_name=CONFIG_NAME, version_base="1.3")(
        run_job
    )
    # A fresh count for each call, when called more than once in a process.
    JOBS.update(code=0, pid=os.getpid(), started=False, sweep=None, ended={}, stops=None)
    argv, full_error = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    extra: list[str] = []
    if not (INFO_FLAGS | CONFIG_FLAGS) & set(args):
        from netprobe import distributed

        extra = distributed.hydra_overrides()
    sys.argv = ["netprobe train", *args, *extra]
    # Hydra raises instead of printing and exiting 1, so that each error gets its exit code.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    interrupted: KeyboardInterrupt | None = None
    try:
        app()
    except KeyboardInterrupt as exc:
        interrupted = exc  # a sweep's table of what its jobs did still closes it
    except JobFailed as exc:
        print(f"netprobe: {exc}", file=sys.stderr)
        JOBS["code"] = max(JOBS["code"], exc.code)
    except HydraException as exc:
        raise ConfigError(hydra_message(exc)) from None
    except Exception as exc:
        if not JOBS["started"]:  # Hydra refused the command line before running anything
            if isinstance(exc, BrokenPipeError):
                raise  # `--help | head`: its output's reader left; the command ends quietly
            raise ConfigError(first_line(exc)) from None
        traceback.print_exc()  # a run that crashed here: its traceback, then exit 1
        JOBS["code"] = max(JOBS["code"], 1)
    finally:
        if JOBS["stops"] is not None:
            JOBS["stops"].__exit__(None, None, None)
        sys.argv = argv
        if full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = full_error
    if JOBS["sweep"] is not None and Path(JOBS["sweep"]).is_dir():
        from netprobe.listing import sweep_summary

        sweep_summary(JOBS["sweep"], JOBS["ended"])
    if interrupted is not None:
        raise interrupted
    return JOBS["code"]
