"""What `netprobe train` checks before Hydra creates a run directory: that the probes can be
built on the model, and that the output folder can be written and holds no other run."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, OmegaConf

from netprobe.errors import ConfigError
from netprobe.lifecycle import RUN_FILE, check_new_run_dir, check_not_a_stray

if TYPE_CHECKING:
    from netprobe.probes import Probe

_checked_probes: set[str] = set()


def check_probes(cfg: DictConfig) -> None:
    """Build the model and its probes once, on the CPU with a blank batch of the data's shape, so a
    bad probe setting (a `layers` pattern matching nothing, an unknown key, a negative threshold)
    or a capture larger than `probes.memory_budget` fails before any run directory exists.
    Configs already checked are skipped."""
    from netprobe.probes import close_probes
    from netprobe.probes.memory import check_budget, parse_budget, split_budget

    probes, budget = split_budget(cfg.probes)
    parse_budget(budget)  # a bad value fails even where no probe needs memory
    data = cfg.data
    key = repr((OmegaConf.to_container(cfg.model, resolve=True), probes, budget,
                data.channels, data.image_size, data.num_classes, data.probe_size))  # fmt: skip
    if key in _checked_probes or not probes:
        return
    built = blank_probes(cfg, probes)
    try:
        # On the host: the training device's own free memory is checked again when the run starts.
        check_budget(built, budget)
    finally:
        close_probes(built)
    _checked_probes.add(key)


def blank_probes(cfg: DictConfig, probes: dict[str, Any]) -> list[Probe]:
    """`probes` built on the config's model with a blank batch of the data's shape, on the CPU,
    as a run would build them (close them after use); bad settings raise ConfigError."""
    from netprobe.models import build_model
    from netprobe.probes import build_probes, probe_context

    data = cfg.data
    # As many samples as the run's probe batches (settings may index into them), as a view of
    # one blank image: no memory per sample.
    n = max(2, int(data.probe_size))
    x = torch.zeros(1, data.channels, data.image_size, data.image_size).expand(n, -1, -1, -1)
    y = torch.zeros(1, dtype=torch.long).expand(n)
    try:
        model = build_model(cfg.model)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - a model that cannot be built fails the run anyway
        raise ConfigError(f"model={cfg.model.name}: cannot build the model: {_line(exc)}") from None
    try:
        ctx = probe_context(model, (x, y), (x, y), seed=int(cfg.seed))
    except Exception as exc:  # noqa: BLE001 - the run's first forward pass would fail the same way
        raise ConfigError(
            f"model={cfg.model.name} fails on a batch of shape {list(x.shape)} "
            f"(data.channels, data.image_size): {_line(exc)}"
        ) from None
    return build_probes(ctx, probes)


def _line(exc: BaseException) -> str:
    """An exception's message on one line (Hydra puts the cause on the next one)."""
    text = " ".join(str(exc).split())
    return text[:300] if text else type(exc).__name__


def check_output_dir(
    args: Sequence[str], overrides: Sequence[str], cfgs: Sequence[DictConfig]
) -> None:
    """The folder Hydra would write (hydra.run.dir, or hydra.sweep.dir with -m) must be writable
    and, unless resuming, must not hold another run: Hydra would overwrite that run's .hydra/
    config (and a sweep's multirun.yaml) before the run itself refused the folder. Resuming,
    each run must be one that its job's config may continue (netprobe.resume.check).

    `overrides` are the first job's own overrides; `cfgs` every job's config, in job order (a
    sweep's job folders are `<sweep.dir>/<job number>` unless sweep.subdir is changed); `args`
    the full command line.
    Folders that cannot be resolved here (Hydra-only interpolations) are left to Hydra.
    """
    resume = bool(cfgs[0].trainer.get("resume"))
    multirun = bool({"-m", "--multirun"} & set(args)) or "hydra.mode=MULTIRUN" in args
    hydra_overrides = [a for a in args if re.match(r"^[+~]*hydra[./]", a)]
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    resolved = _resolve(key, [*overrides, *hydra_overrides])
    if resolved is None:
        return
    folder, subdir = resolved
    path = Path(folder).expanduser()
    check_writable(path, key)
    if not path.is_dir():
        return
    if not multirun:
        check_run_dir(path, resume, cfgs[0])
    elif subdir == "${hydra.job.num}":
        for num, cfg in enumerate(cfgs):
            if (path / str(num)).is_dir():
                check_run_dir(path / str(num), resume, cfg)


def check_run_dir(path: Path, resume: bool, cfg: DictConfig | None = None) -> None:
    """A new run needs a folder holding no run; resuming, a run that `cfg` may continue (when
    given), or a folder holding nothing that looks like one."""
    from netprobe import resume as resuming

    if not resume:
        check_new_run_dir(path)
    elif (path / RUN_FILE).exists():
        if cfg is not None:
            resuming.check(cfg, path)
    else:
        check_not_a_stray(path)


def check_writable(path: Path, key: str = "output folder") -> None:
    """Raise ConfigError unless `path` exists as a writable folder or could be created."""
    existing = path.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"{key}={path} cannot be created: {existing} is a file, not a folder; "
            f"choose another folder ({key}=... or out_root=...)"
        )
    try:
        # The one sure test is to write: permissions, read-only mounts, root's exceptions.
        os.rmdir(tempfile.mkdtemp(prefix=".netprobe-write-check-", dir=existing))
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(
            f"{key}={path} cannot be written: making a folder in {existing} failed ({reason}); "
            f"choose a writable folder ({key}=... or out_root=...)"
        ) from None


def _resolve(key: str, overrides: list[str]) -> tuple[str, str] | None:
    """The value of `key` in the composed Hydra config, and hydra.sweep.subdir unresolved."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from netprobe.config import CONFIG_NAME, conf_dir

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            cfg = compose(CONFIG_NAME, overrides=overrides, return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)
            value = OmegaConf.select(cfg, key)
            subdir = OmegaConf.to_container(cfg.hydra.sweep, resolve=False).get("subdir")
    except Exception:  # noqa: BLE001 - whatever Hydra alone can resolve, Hydra will check
        return None
    finally:
        HydraConfig.instance().cfg = None
        GlobalHydra.instance().clear()
    return (str(value), str(subdir)) if value is not None else None
