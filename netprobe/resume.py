"""Resuming an interrupted run in its own directory (`trainer.resume=true hydra.run.dir=RUN`):
whether a command may continue a run, from which checkpoint, and putting its state back."""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from netprobe.checkpoint import checkpoint_path, load_checkpoint, set_rng_states
from netprobe.config import bookkeeping
from netprobe.errors import ConfigError, NothingToDo, first_line
from netprobe.lifecycle import check_not_a_stray
from netprobe.progress import plural
from netprobe.store import RUN_FILE, TABLES, damaged_part, flatten, read_info

_RESUME = re.compile(r"^\+*trainer\.resume=(true|True|1)$")


def resuming(cfg: DictConfig) -> bool:
    """Whether `cfg` asks to continue the run in its directory if there is one: a directory
    holding no run yet starts from the beginning, so a sweep sent with `trainer.resume=true` from
    the outset can be sent again (or requeued) and every job picks up where it stopped."""
    return bool(cfg.trainer.get("resume", False))


def check_command_line(args: Sequence[str]) -> None:
    """Before Hydra makes a directory: resuming needs the run's own directory on the command line
    (`hydra.run.dir=RUN`, or `hydra.sweep.dir=SWEEP` to resume every job of a sweep); without
    it Hydra would make a new, timestamped one."""
    if not any(_RESUME.match(a) for a in args):
        return
    sweep = bool({"-m", "--multirun"} & set(args))
    key = "hydra.sweep.dir" if sweep else "hydra.run.dir"
    if not any(a.startswith(f"{key}=") for a in args):
        what = "sweep" if sweep else "run"
        raise ConfigError(f"trainer.resume=true needs {key}=<the {what} directory to continue>")


def start(cfg: DictConfig, run_dir: str | Path, writes: bool = True) -> dict[str, Any] | None:
    """The checkpoint `run_dir` continues from, or None when not resuming (or nothing to resume).

    Only reads: the run must be a run, its config must agree with `cfg` (`check`), and its
    `last.pt` must be whole. The rows of later epochs are dropped once the monitor holds the
    directory's lock (lifecycle.claim_run_dir) and hands it to the run's writer
    (netprobe.store.RunWriter). `writes`: whether this process writes the run (it says when there
    is nothing to resume)."""
    if not resuming(cfg):
        return None
    run_dir = Path(run_dir)
    check_not_a_stray(run_dir)
    if not (run_dir / RUN_FILE).exists():
        if writes:
            print(f"netprobe: no run in {run_dir} to resume; starting it", file=sys.stderr)
        return None
    stored = check(cfg, run_dir)
    info = read_info(run_dir)
    max_steps = cfg.trainer.get("max_steps")
    path = checkpoint_path(run_dir, "last")
    # A damaged last.pt is said whether or not there is anything to train.
    state = load_checkpoint(path) if path.exists() else None
    done = ended(info, cfg.trainer, stored.trainer, state)
    if done is not None:
        # Nothing to train, but a damaged part file is still said, as a resume that trains would.
        damaged = damaged_part(run_dir, TABLES)
        if damaged is not None:
            raise ConfigError(f"{damaged[0]} is damaged ({damaged[1]}); the run is left as it was")
        more = (  # stuck at its non-finite loss (`stop`: `ended` gives why), or trained out
            "trainer.on_nonfinite=continue trains on past its non-finite loss"
            if done != info.get("status")
            else "a larger trainer.epochs, trainer.max_steps or trainer.target_val_acc trains on"
        )
        raise NothingToDo(
            f"the run in {run_dir} {done} after {plural(info.get('epochs_done', 0), 'epoch')}, "
            f"{plural(info.get('steps_done', 0), 'step')}; nothing to resume, and it is left as "
            f"it was ({more})"
        )
    if state is None:
        raise ConfigError(
            f"trainer.resume=true, but {path} does not exist: the run saved no checkpoint "
            "(trainer.checkpoint_every=0, or it stopped in its first epoch)"
        )
    if "monitor" not in state or "data" not in state:
        raise ConfigError(f"{path} lacks the probe and data state needed to resume")
    if max_steps and max_steps < state["step"]:
        raise ConfigError(
            f"trainer.resume=true refused: trainer.max_steps={max_steps} is fewer than the "
            f"{state['step']} steps the run in {run_dir} keeps from {path.name}; only a larger "
            "trainer.max_steps may be given"
        )
    return state


def ended(
    info: dict[str, Any], trainer: DictConfig, before: DictConfig, last: dict[str, Any] | None
) -> str | None:
    """How the run (its run.json `info`, its own trainer config `before`, its last.pt state
    `last`) already ended for good under `trainer`, or None when a resume has training to do.

    A run that diverged while `trainer.on_nonfinite=stop` would only train from its last.pt into
    the same non-finite loss: it has ended, whatever its epochs; `continue` trains on past it."""
    status = info.get("status")
    if status == "diverged" and trainer.get("on_nonfinite", "stop") == "stop":
        return f"diverged ({info.get('error') or 'a non-finite loss'})"
    if status in ("completed", "diverged") and finished(info, trainer, before, last):
        return str(status)
    return None


def finished(
    info: dict[str, Any], trainer: DictConfig, before: DictConfig, last: dict[str, Any] | None
) -> bool:
    """Whether a completed run (its run.json `info`, its own trainer config `before`, its last.pt
    state `last`) already met a stop rule of `trainer`: its epochs, its steps, or the validation
    accuracy it was to reach (which it stopped at). A run its max_steps stopped may have stopped
    inside its last epoch, which `epochs_done` counts: its whole epochs are last.pt's."""
    steps, max_steps = info.get("steps_done", 0), trainer.get("max_steps")
    target, val_acc = trainer.get("target_val_acc"), (info.get("final") or {}).get("val_acc")
    epochs = info.get("epochs_done", 0)
    if before.get("max_steps") and steps >= before.max_steps and last is not None:
        epochs = last.get("epoch", epochs - 1) + 1
    return (
        epochs >= trainer.epochs
        or bool(max_steps and steps >= max_steps)
        or (target is not None and val_acc is not None and val_acc >= target)
    )


# Keys a resumed run may change (SPEC §1) besides its bookkeeping: when it stops, and where and
# how fast it runs. Every other key defines what the stored rows mean.
MAY_CHANGE = (
    "trainer.epochs", "trainer.max_steps", "trainer.target_val_acc", "trainer.on_nonfinite",
    "trainer.device", "trainer.compile", "trainer.deterministic", "data.on_device",
    "optim.lr_schedulers.cosine.T_max",  # trainer.epochs; the checkpoint's own T_max is restored
)  # fmt: skip
CONFIG = Path(".hydra") / "config.yaml"


def check(cfg: DictConfig, run_dir: str | Path) -> DictConfig:
    """Refuse to resume the run in `run_dir` with `cfg` unless every key that defines its stored
    rows is as the run's own config has it: one line naming each differing key, both values.
    Returns the run's own config."""
    run_dir = Path(run_dir)
    read_info(run_dir)
    path = run_dir / CONFIG
    if not path.exists():
        raise ConfigError(
            f"{run_dir} holds no {CONFIG} to check trainer.resume=true against; "
            "it cannot be resumed"
        )
    try:
        stored = OmegaConf.load(path)
    except Exception as exc:  # noqa: BLE001 - a damaged YAML file, whatever the parser says
        raise ConfigError(f"{path} is damaged ({first_line(exc)}); it cannot be resumed") from None
    before, now = _flat(stored), _flat(cfg)
    # A run from before optimizers were `_target_` recipes lacks these keys; its optimizer and
    # scheduler were the ones `optim.name` and `optim.scheduler` name, as now.
    # A run from before probes had `enabled` in their config ran every probe it lists.
    for key in now.keys() - before.keys():
        listed = key.startswith("probes.") and _absent_group(key, before) is None
        if key.startswith(("optim._", "optim.lr_schedulers.")) or (
            listed and key.endswith(".enabled") and now[key] is True
        ):
            before[key] = now[key]
    missing = "(absent)"
    differ: dict[str, str] = {}
    for key in sorted(before.keys() | now.keys()):
        if (
            key in MAY_CHANGE
            or bookkeeping(key)
            or before.get(key, missing) == now.get(key, missing)
        ):
            continue
        # A group one side lacks as a whole (a probe the run did not select) is named once.
        name = _absent_group(key, before) or _absent_group(key, now) or key
        was = _show(before.get(key, missing)) if name == key else _present(name, before)
        is_ = _show(now.get(key, missing)) if name == key else _present(name, now)
        differ.setdefault(name, f"{name}={was} (the run's) vs {is_}")
    differ = list(differ.values())
    epochs = before.get("trainer.epochs")
    if isinstance(epochs, int) and now["trainer.epochs"] < epochs:
        differ.append(f"trainer.epochs={now['trainer.epochs']} is fewer than the run's {epochs}")
    if differ:
        raise ConfigError(
            f"trainer.resume=true refused: the run in {run_dir} differs in {'; '.join(differ)}. "
            "A resumed run keeps its model, data, init, optim, seed, probes and precision; only "
            "trainer.epochs (larger), max_steps, logging, device and launcher may change"
        )
    return stored


def _absent_group(key: str, flat: Mapping[str, Any]) -> str | None:
    """The shortest group holding `key` (`probes.weights` of `probes.weights.bins`) of which
    `flat` has no key at all, if any."""
    parts = key.split(".")
    for n in range(2, len(parts)):
        group = ".".join(parts[:n])
        if not any(k.startswith(f"{group}.") for k in flat):
            return group
    return None


def _present(group: str, flat: Mapping[str, Any]) -> str:
    return "(set)" if any(k.startswith(f"{group}.") for k in flat) else "(absent)"


def _flat(cfg: DictConfig) -> dict[str, Any]:
    """Every leaf of `cfg` by its dotted key, interpolations resolved where they can be."""
    try:
        tree = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - an interpolation only Hydra could resolve
        tree = OmegaConf.to_container(cfg, resolve=False)
    return flatten(tree)


def _show(value: Any) -> str:
    return "null" if value is None else str(value)


def restore(
    state: dict[str, Any],
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    batches: Any,
) -> int:
    """Put the training state back as it was at the checkpoint; returns the epoch to run next.
    The RNG goes last: building the model and the probes must not move it."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    batches.load_state_dict(state["data"])
    set_rng_states(state["rng"])
    return state["epoch"] + 1
