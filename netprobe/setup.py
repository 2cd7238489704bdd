"""What a run trains with: `build(cfg, run_dir) -> Setup` makes the model, optimizer, data,
precision and process context from the composed config; and the run's own record of them (the
run.json fields, `.hydra/config.yaml`)."""

from __future__ import annotations

import contextlib
import inspect
import random
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from netprobe import distributed, resume
from netprobe.config import optimizer_name
from netprobe.data import Batches, ImageData, build_data, fixed_batch, keep_on_device
from netprobe.errors import ConfigError, StorageError, first_line
from netprobe.init import initialize
from netprobe.models import build_model
from netprobe.store import atomic_write

Batch = tuple[torch.Tensor, torch.Tensor]
# optim keys that are netprobe's rather than the optimizer's: the label and the lr schedule.
NOT_OPTIMIZER_KEYS = ("name", "scheduler", "step_size", "gamma", "lr_schedulers")


@dataclass
class Setup:
    """Everything the loop trains with; built once, before the monitor is attached."""

    cfg: DictConfig
    run_dir: Path
    ddp: distributed.DDPContext
    device: torch.device
    data: ImageData
    model: nn.Module
    forward: Callable[[torch.Tensor], torch.Tensor]  # the model, under DDP and torch.compile
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    autocast: Callable[[], contextlib.AbstractContextManager]
    scaler: torch.amp.GradScaler
    train_batches: Batches
    val_batches: Batches
    probe_batch: Batch  # fixed train samples every capture reads
    valid_batch: Batch  # fixed validation samples, for probes comparing sources
    info: dict[str, Any]  # what run.json records of the run's setup
    resume_state: dict[str, Any] | None  # the checkpoint a resumed run continues from


def build(cfg: DictConfig, run_dir: str | Path) -> Setup:
    """Seed, join the other ranks, and build what `cfg` names, in an order that keeps every run's
    random numbers as they were (the RNG of a resumed run is restored after)."""
    t = cfg.trainer
    seed_everything(cfg.seed, t.deterministic)
    ddp, device = distributed.setup(resolve_device(t.device))
    run_dir = Path(distributed.from_main(str(run_dir), ddp))
    state = resume.start(cfg, run_dir, writes=ddp.is_main)
    data = build_data(cfg.data)
    model = build_model(cfg.model)
    initialize(model, cfg.init)
    model.to(device)
    optimizer, scheduler = build_optimizer(model, cfg.optim)
    train_batches, val_batches = build_batches(cfg, data, device, ddp)
    probe_batch = fixed_batch(data, "train", cfg.data.probe_size, device)
    valid_batch = fixed_batch(data, "val", cfg.data.probe_size, device)
    autocast, scaler = mixed_precision(str(t.precision), device)
    forward = distributed.wrap(model, ddp, device)
    forward = torch.compile(forward) if t.compile else forward
    return Setup(
        cfg=cfg,
        run_dir=run_dir,
        ddp=ddp,
        device=device,
        data=data,
        model=model,
        forward=forward,
        optimizer=optimizer,
        scheduler=scheduler,
        autocast=autocast,
        scaler=scaler,
        train_batches=train_batches,
        val_batches=val_batches,
        probe_batch=probe_batch,
        valid_batch=valid_batch,
        info=run_info(cfg, device, ddp),
        resume_state=state,
    )


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_optimizer(
    model: nn.Module, optim: DictConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """The optimizer `optim._target_` names over the model's parameters, given every optim key
    but netprobe's own, and the scheduler `optim.scheduler` names in `optim.lr_schedulers`."""
    recipe = {k: v for k, v in optim.items() if k not in NOT_OPTIMIZER_KEYS}
    optimizer = _build("optim", recipe, model.parameters())
    name = optim.get("scheduler")
    if name is None:
        return optimizer, None
    return optimizer, _build(f"optim.lr_schedulers.{name}", optim.lr_schedulers[name], optimizer)


def _build(key: str, recipe: Any, first: Any) -> Any:
    """`hydra.utils.instantiate` of a `_partial_` recipe, called with `first`; a bad target, key
    or value is one line naming `key` and what the target accepts."""
    from hydra.utils import instantiate

    try:
        return instantiate(recipe, _convert_="all")(first)
    except Exception as exc:  # noqa: BLE001 - whatever the target's import or signature raised
        message = f"{key} cannot be built: {first_line(exc).split(', set env var HYDRA')[0]}"
        module, _, name = str(recipe["_target_"]).rpartition(".")
        with contextlib.suppress(Exception):  # a target that does not exist: the message says so
            accepted = list(inspect.signature(getattr(import_module(module), name)).parameters)
            message += f"; {recipe['_target_']} takes {', '.join(accepted[1:])}"
        raise ConfigError(message) from None


def check_optimizer(optim: DictConfig) -> None:
    """Build the optimizer and scheduler `optim` names over a stand-in parameter, so that a bad
    target or key is refused before any run directory exists."""
    build_optimizer(nn.Linear(1, 1), optim)


def build_batches(
    cfg: DictConfig, data: ImageData, device: torch.device, ddp: distributed.DDPContext
) -> tuple[Batches, Batches]:
    """Shuffled training batches (this rank's share of each) and validation batches of 512."""
    on_device = keep_on_device(cfg.data.on_device, data, device)
    train = Batches(
        data,
        "train",
        cfg.data.batch_size,
        device,
        shuffle=True,
        seed=cfg.seed,
        on_device=on_device,
        num_workers=cfg.data.num_workers,
        augment=cfg.data.augment,
        rank=ddp.rank,
        world_size=ddp.world_size,
    )
    return train, Batches(data, "val", 512, device, shuffle=False, on_device=on_device)


def mixed_precision(
    precision: str, device: torch.device
) -> tuple[Callable[[], contextlib.AbstractContextManager], torch.amp.GradScaler]:
    """The autocast context for `trainer.precision` and the loss scaler (enabled for 16 only)."""
    dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(precision)
    autocast = (
        (lambda: torch.autocast(device.type, dtype=dtype))
        if dtype is not None
        else contextlib.nullcontext
    )
    return autocast, torch.amp.GradScaler(device.type, enabled=precision == "16")


def run_info(cfg: DictConfig, device: torch.device, ddp: distributed.DDPContext) -> dict[str, Any]:
    """What run.json records of the setup: names of what was chosen, versions, the code's commit."""
    return {
        "name": cfg.name,
        "device": str(device),
        "torch_version": torch.__version__,
        "git_sha": git_sha(),
        "model": cfg.model.name,
        "data": cfg.data.name,
        "init": cfg.init.name,
        "optim": optimizer_name(cfg.optim),
        "epochs": cfg.trainer.epochs,
        "world_size": ddp.world_size,
    }


def git_sha() -> str | None:
    """The commit of netprobe's own source tree, or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def save_config(cfg: DictConfig, run_dir: Path) -> None:
    """`.hydra/config.yaml` and, under Hydra, `hydra.yaml` and `overrides.yaml`: what Hydra writes
    itself before a job starts, written here once the run holds its directory (Hydra is told not
    to, in conf/config.yaml), so that a refused start leaves the folder as it was."""
    from hydra.core.hydra_config import HydraConfig

    files = {"config.yaml": cfg}
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        files["hydra.yaml"] = OmegaConf.create({"hydra": hydra_cfg})
        files["overrides.yaml"] = OmegaConf.create(list(hydra_cfg.overrides.task))
    folder = run_dir / ".hydra"
    try:
        folder.mkdir(exist_ok=True)
    except OSError as exc:
        raise StorageError(folder, exc) from None
    for name, content in files.items():
        atomic_write(folder / name, lambda tmp, c=content: OmegaConf.save(c, tmp))
