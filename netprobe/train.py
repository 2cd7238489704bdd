"""The training run: compose → build → loop → close. `netprobe train` runs it through Hydra."""

from __future__ import annotations

import contextlib
import random
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

import netprobe
from netprobe import distributed, resume
from netprobe.checkpoint import checkpoint_path, save_checkpoint
from netprobe.config import validate
from netprobe.data import Batches, build_data, fixed_batch, keep_on_device
from netprobe.errors import StorageError
from netprobe.init import initialize
from netprobe.lifecycle import StopSignals
from netprobe.models import build_model
from netprobe.probes.memory import split_budget
from netprobe.progress import TrainProgress, banner
from netprobe.store import atomic_write


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


def build_optimizer(model: nn.Module, cfg: Any, epochs: int) -> tuple[torch.optim.Optimizer, Any]:
    params = model.parameters()
    if cfg.name == "sgd":
        opt = torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            nesterov=cfg.nesterov,
        )
    elif cfg.name in ("adam", "adamw"):
        cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
        opt = cls(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    else:
        from netprobe.errors import ConfigError

        raise ConfigError(f"unknown optim {cfg.name!r}; valid optim options: sgd, adam, adamw")
    scheduler = None
    if cfg.get("scheduler") == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    elif cfg.get("scheduler") == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
    return opt, scheduler


def git_sha() -> str | None:
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


@torch.no_grad()
def evaluate(model: nn.Module, batches: Batches, autocast: Any) -> tuple[float, float]:
    """Mean loss and accuracy over a split, in eval mode; one host sync at the end."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=batches.device)
    correct = torch.zeros((), device=batches.device, dtype=torch.int64)
    for x, y in batches:
        with autocast():
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    model.train(was_training)
    n = max(batches.n, 1)
    return float(loss_sum) / n, float(correct) / n


def train_step(
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    autocast: Callable[[], contextlib.AbstractContextManager],
    mon: netprobe.Monitor,
    log_every: int = 1,
    place: distributed.Distributed | None = None,
) -> torch.Tensor:
    """One optimizer step with the monitor's two calls around it; returns the loss (on the
    device). Nothing here reads a value back to the host (precision 16 aside: GradScaler checks
    for inf once per step)."""
    with autocast():
        logits = forward(x)
        loss = F.cross_entropy(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    acc = (logits.argmax(1) == y).float().mean() if mon.state.step % log_every == 0 else None
    batch_size = len(y)
    if place is not None and place.enabled:
        # The whole global batch's loss and accuracy, as one process would record them.
        pair = torch.stack([loss.detach(), loss.new_zeros(()) if acc is None else acc])
        pair = distributed.mean_over_ranks(pair, place)
        loss, acc = pair[0], None if acc is None else pair[1]
        batch_size *= place.world_size
    scale = scaler._get_scale_async() if scaler.is_enabled() else None  # a tensor: no read back
    mon.after_backward(loss, acc=acc, batch_size=batch_size, loss_scale=scale)
    scaler.step(optimizer)
    scaler.update()
    mon.after_step()
    return loss


def train(cfg: DictConfig, run_dir: str | Path) -> str:
    """Train as `cfg` says, with its probes attached, into `run_dir`; returns the final status.

    Under torchrun every rank calls this; rank 0's `run_dir` is used and only rank 0 writes.
    With `trainer.resume`, training continues from the run's last checkpoint (netprobe.resume).
    """
    validate(cfg)
    t = cfg.trainer
    seed_everything(cfg.seed, t.deterministic)
    place, device = distributed.setup(resolve_device(t.device))
    run_dir = Path(distributed.from_main(str(run_dir), place))
    state = resume.start(cfg, run_dir, writes=place.is_main)
    data = build_data(cfg.data)
    model = build_model(cfg.model)
    initialize(model, cfg.init)
    model.to(device)
    optimizer, scheduler = build_optimizer(model, cfg.optim, t.epochs)
    on_device = keep_on_device(cfg.data.on_device, data, device)
    train_batches = Batches(
        data,
        "train",
        cfg.data.batch_size,
        device,
        shuffle=True,
        seed=cfg.seed,
        on_device=on_device,
        num_workers=cfg.data.num_workers,
        augment=cfg.data.augment,
        rank=place.rank,
        world_size=place.world_size,
    )
    val_batches = Batches(data, "val", 512, device, shuffle=False, on_device=on_device)
    probe_batch = fixed_batch(data, "train", cfg.data.probe_size, device)
    valid_batch = fixed_batch(data, "val", cfg.data.probe_size, device)

    precision = str(t.precision)
    dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(precision)
    autocast = (
        (lambda: torch.autocast(device.type, dtype=dtype))
        if dtype is not None
        else contextlib.nullcontext
    )
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "16")
    forward = distributed.wrap(model, place, device)
    forward = torch.compile(forward) if t.compile else forward

    info = {
        "name": cfg.name,
        "device": str(device),
        "torch_version": torch.__version__,
        "git_sha": git_sha(),
        "model": cfg.model.name,
        "data": cfg.data.name,
        "init": cfg.init.name,
        "optim": cfg.optim.name,
        "epochs": t.epochs,
    }
    probes, budget = split_budget(OmegaConf.to_container(cfg.probes, resolve=True))
    total_steps = t.epochs * len(train_batches)
    if place.is_main:
        sink = None
        if t.get("tensorboard"):
            from netprobe.store import flatten
            from netprobe.tensorboard import TB_DIR, EventWriter

            hparams = flatten(OmegaConf.to_container(cfg, resolve=True))
            sink = EventWriter(run_dir / TB_DIR, hparams=hparams)
        mon = netprobe.attach(
            model,
            run_dir,
            probes=probes,
            probe_batch=probe_batch,
            loss_fn=F.cross_entropy,
            valid_batch=valid_batch,
            optimizer=optimizer,
            info={**info, "world_size": place.world_size},
            seed=cfg.seed,
            flush_every=t.flush_every,
            memory_budget=budget,
            on_nonfinite=t.get("on_nonfinite", "stop"),
            resume=state["monitor"] if state else None,
            sink=sink,
        )
    else:
        mon = distributed.FollowerMonitor(on_nonfinite=t.get("on_nonfinite", "stop"))
        if state:
            mon.load_state_dict(state["monitor"])
    first_epoch = 0
    if state:
        first_epoch = resume.restore(
            state,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            batches=train_batches,
        )
    progress = TrainProgress(
        run_dir,
        total=min(t.max_steps or total_steps, total_steps),
        epochs=t.epochs,
        first_step=mon.state.step,
        interval_s=t.log_interval_s,
        quiet=not place.is_main,
    )
    start = banner(
        cfg,
        run_dir,
        resumed_at=(first_epoch, mon.state.step) if state else None,
        device=str(device) + (f" × {place.world_size} processes" if place.enabled else ""),
        parameters=sum(p.numel() for p in model.parameters()),
        samples=(data.x_train.shape[0], data.x_val.shape[0]),
        steps=(len(train_batches), progress.total),
        probes=[p.name for p in getattr(mon, "probes", [])],
    )
    for line in start:
        progress.print(line)

    def checkpoint(name: int | str, epoch: int) -> None:
        if not place.is_main:
            return
        save_checkpoint(
            checkpoint_path(run_dir, name),
            model,
            epoch=epoch,
            step=mon.state.step,
            optimizer=optimizer,
            scheduler=scheduler.state_dict() if scheduler is not None else None,
            scaler=scaler.state_dict(),
            # What resuming needs besides: probe state and where the data order is.
            monitor=mon.state_dict(),
            data=train_batches.state_dict(),
        )

    stop_reason = None
    stop_on_nonfinite = mon.on_nonfinite == "stop"

    def nonfinite_step(sync_point: bool) -> int | None:
        """The first step with a non-finite loss, when training should stop for it. Under DDP
        every rank must stop at the same step: rank 0's answer is shared, at the points where
        it syncs with the device anyway (flushes, epoch ends)."""
        if not stop_on_nonfinite:
            return None
        if not place.enabled:
            return mon.nonfinite_step
        return distributed.from_main(mon.nonfinite_step, place) if sync_point else None

    with StopSignals(), mon, progress:
        if place.is_main:
            # Only now, the directory locked and checked, is the config written (a failure to
            # write it fails the run like any other write).
            save_config(cfg, run_dir)
        if t.checkpoint_every and state is None:
            checkpoint("start", epoch=-1)
        model.train()
        for epoch in range(first_epoch, t.epochs):
            if t.max_steps and mon.state.step >= t.max_steps:  # a resumed run already there
                stop_reason = f"reached trainer.max_steps={t.max_steps}"
                break
            steps_at_start = mon.state.step
            progress.start_epoch(epoch)
            for x, y in train_batches:
                loss = train_step(
                    forward, x, y, optimizer, scaler, autocast, mon, t.log_every, place
                )
                progress.advance(loss, len(y) * place.world_size)
                bad = nonfinite_step(mon.state.step % t.flush_every == 0)
                if bad is not None:
                    stop_reason = f"non-finite loss at step {bad}"
                    break
                if t.max_steps and mon.state.step >= t.max_steps:
                    stop_reason = f"reached trainer.max_steps={t.max_steps}"
                    break
            if nonfinite_step(sync_point=True) is not None:
                break  # the weights are no longer numbers: nothing to evaluate or save
            if scheduler is not None:
                scheduler.step()
            # Every rank evaluates the same weights; rank 0's numbers decide, so all stop alike.
            val_loss, val_acc = distributed.from_main(evaluate(model, val_batches, autocast), place)
            mon.end_epoch(val_loss=val_loss, val_acc=val_acc)
            progress.epoch_done(epoch, mon.latest())
            if t.checkpoint_every:
                if (epoch + 1) % t.checkpoint_every == 0:
                    checkpoint(epoch, epoch)
                # Resuming starts at an epoch boundary: an epoch cut short by max_steps leaves
                # last.pt at the epoch before, so a resumed run redoes it whole.
                if mon.state.step - steps_at_start == len(train_batches):
                    checkpoint("last", epoch)
            if stop_reason:
                break
            if t.target_val_acc is not None and val_acc >= t.target_val_acc:
                stop_reason = f"validation accuracy {val_acc:.4f} ≥ target {t.target_val_acc}"
                break
        if stop_reason:
            mon.writer.update(stop_reason=stop_reason)
    return mon.writer.info["status"]


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
