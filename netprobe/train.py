"""The training setup, read top to bottom: build (netprobe.setup) → attach the monitor → fit: epochs
of steps, then validation, checkpoints and the stop rules → close. `netprobe train` runs it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

import netprobe
from netprobe import distributed, resume
from netprobe.checkpoint import checkpoint_path, save_checkpoint
from netprobe.config import validate
from netprobe.data import Batches
from netprobe.lifecycle import StopSignals, signals_held
from netprobe.native import step as native_step
from netprobe.probes.memory import split_budget
from netprobe.progress import TrainProgress, banner
from netprobe.setup import Setup, build, save_config

# Rank 0 attaches the real one; the other ranks a stand-in with the same public methods.
AnyMonitor = netprobe.Monitor | distributed.FollowerMonitor


def train(cfg: DictConfig, run_dir: str | Path) -> str:
    """Train as `cfg` says, with its probes attached, into `run_dir`; returns the final status.

    Under torchrun every rank calls this; rank 0's `run_dir` is used and only rank 0 writes.
    With `trainer.resume`, training continues from the run's last checkpoint (netprobe.resume).
    """
    validate(cfg)
    setup = build(cfg, run_dir)
    # From the moment the run holds its directory (its start captures may take a while), a stop
    # signal ends it `interrupted`, never with its run.json left `running`.
    with StopSignals(), attach(setup) as mon:
        first_epoch = restore(setup) if setup.resume_state else 0
        with start_progress(setup, mon, first_epoch) as progress:
            if setup.ddp.is_main:
                # Only now, the directory locked and checked, is the config written (a failure
                # to write it fails the run like any other write).
                save_config(cfg, setup.run_dir)
            if cfg.trainer.checkpoint_every and setup.resume_state is None:
                checkpoint(setup, mon, "start", epoch=-1)
            reason = fit(setup, mon, progress, first_epoch)
            if reason:
                mon.stop(reason)
    return mon.status


def fit(setup: Setup, mon: AnyMonitor, progress: TrainProgress, first_epoch: int) -> str | None:
    """Epochs of training steps, each followed by validation and checkpoints, until the last epoch
    or a stop rule; returns why training stopped early (None when it did not)."""
    t = setup.cfg.trainer
    setup.model.train()
    for epoch in range(first_epoch, t.epochs):
        if reached_max_steps(setup, mon):  # a resumed run already there
            return f"reached trainer.max_steps={t.max_steps}"
        steps_at_start = mon.state.step
        progress.start_epoch(epoch)
        reason = train_epoch(setup, mon, progress)
        if nonfinite_step(setup, mon, sync_point=True) is not None:
            return reason  # the weights are no longer numbers: nothing to evaluate or save
        val_acc = end_epoch(setup, mon, progress, epoch)
        whole = mon.state.step - steps_at_start == len(setup.train_batches)
        save_epoch_checkpoints(setup, mon, epoch, whole)
        if reason:
            return reason
        if t.target_val_acc is not None and val_acc >= t.target_val_acc:
            return f"validation accuracy {val_acc:.4f} ≥ target {t.target_val_acc}"
    return None


def train_epoch(setup: Setup, mon: AnyMonitor, progress: TrainProgress) -> str | None:
    """One pass over the training batches; returns why it stopped before the last, if it did."""
    t = setup.cfg.trainer
    for x, y in setup.train_batches:
        loss = train_step(
            setup.forward,
            x,
            y,
            setup.optimizer,
            setup.scaler,
            setup.autocast,
            mon,
            t.log_every,
            setup.ddp,
        )
        progress.advance(loss, len(y) * setup.ddp.world_size)
        bad = nonfinite_step(setup, mon, sync_point=mon.state.step % t.flush_every == 0)
        if bad is not None:
            return f"non-finite loss at step {bad}"
        if reached_max_steps(setup, mon):
            return f"reached trainer.max_steps={t.max_steps}"
    return None


def train_step(
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    autocast: Callable[[], contextlib.AbstractContextManager],
    mon: AnyMonitor,
    log_every: int = 1,
    ddp: distributed.DDPContext | None = None,
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
    acc = batch_accuracy(logits, y) if mon.state.step % log_every == 0 else None
    batch_size = len(y)
    if ddp is not None and ddp.enabled:
        # The whole global batch's loss and accuracy, as one process would record them.
        # new_zeros, not a tensor of 0.0: copying a host number to a GPU waits for the device
        # (the accuracy is a Python float only on a CPU, from the fused loop).
        if acc is None:
            shared = loss.new_zeros(())
        else:
            shared = torch.as_tensor(acc, dtype=loss.dtype, device=loss.device)
        pair = torch.stack([loss.detach(), shared])
        pair = distributed.mean_over_ranks(pair, ddp)
        loss, acc = pair[0], None if acc is None else pair[1]
        batch_size *= ddp.world_size
    scale = scaler._get_scale_async() if scaler.is_enabled() else None  # a tensor: no read back
    mon.after_backward(loss, acc=acc, batch_size=batch_size, loss_scale=scale)
    scaler.step(optimizer)
    scaler.update()
    mon.after_step()
    return loss


def batch_accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor | float:
    """The batch's top-1 accuracy: on the CPU a float from one fused pass, elsewhere a device
    scalar (nothing read back)."""
    fused = native_step.accuracy(logits, y)
    return (logits.argmax(1) == y).float().mean() if fused is None else fused


def end_epoch(setup: Setup, mon: AnyMonitor, progress: TrainProgress, epoch: int) -> float:
    """Step the lr schedule, validate, and record the epoch; returns the validation accuracy."""
    if setup.scheduler is not None:
        setup.scheduler.step()
    # Every rank evaluates the same weights; rank 0's numbers decide, so all stop alike.
    val_loss, val_acc = distributed.from_main(
        evaluate(setup.model, setup.val_batches, setup.autocast), setup.ddp
    )
    mon.end_epoch(val_loss=val_loss, val_acc=val_acc)
    progress.epoch_done(epoch, mon.latest())
    return val_acc


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Batches, autocast: Callable[[], contextlib.AbstractContextManager]
) -> tuple[float, float]:
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


# ---------------------------------------------------------------- stop rules


def reached_max_steps(setup: Setup, mon: AnyMonitor) -> bool:
    max_steps = setup.cfg.trainer.max_steps
    return bool(max_steps) and mon.state.step >= max_steps


def nonfinite_step(setup: Setup, mon: AnyMonitor, sync_point: bool) -> int | None:
    """The first step with a non-finite loss, when training should stop for it. Under DDP every
    rank must stop at the same step: rank 0's answer is shared, at the points where it syncs
    with the device anyway (flushes, epoch ends)."""
    if mon.on_nonfinite != "stop":
        return None
    if not setup.ddp.enabled:
        return mon.nonfinite_step
    return distributed.from_main(mon.nonfinite_step, setup.ddp) if sync_point else None


# ---------------------------------------------------------------- checkpoints


def save_epoch_checkpoints(setup: Setup, mon: AnyMonitor, epoch: int, whole: bool) -> None:
    """`epoch-NNNN.pt` every `trainer.checkpoint_every` epochs; `last.pt` after each whole one."""
    every = setup.cfg.trainer.checkpoint_every
    if not every:
        return
    # A stop signal waits for both: an epoch whose epoch-NNNN.pt was written but not its last.pt
    # could not be resumed from. last.pt, what resuming reads, goes first (a disk that fills
    # between the two still leaves it).
    with signals_held():
        # Resuming starts at an epoch boundary: an epoch cut short by max_steps leaves last.pt at
        # the epoch before, so a resumed run redoes it whole.
        if whole:
            checkpoint(setup, mon, "last", epoch)
        if (epoch + 1) % every == 0:
            checkpoint(setup, mon, epoch, epoch)


def checkpoint(setup: Setup, mon: AnyMonitor, name: int | str, epoch: int) -> None:
    if not setup.ddp.is_main:
        return
    save_checkpoint(
        checkpoint_path(setup.run_dir, name),
        setup.model,
        epoch=epoch,
        step=mon.state.step,
        optimizer=setup.optimizer,
        scheduler=setup.scheduler.state_dict() if setup.scheduler is not None else None,
        scaler=setup.scaler.state_dict(),
        # What resuming needs besides: probe state and where the data order is.
        monitor=mon.state_dict(),
        data=setup.train_batches.state_dict(),
    )


def restore(setup: Setup) -> int:
    """Put a resumed run's training state back; returns the epoch to run next."""
    return resume.restore(
        setup.resume_state,
        model=setup.model,
        optimizer=setup.optimizer,
        scheduler=setup.scheduler,
        scaler=setup.scaler,
        batches=setup.train_batches,
    )


# ---------------------------------------------------------------- monitor and console


def attach(setup: Setup) -> AnyMonitor:
    """The probes on rank 0, writing the run; a counting stand-in on every other rank."""
    cfg, t = setup.cfg, setup.cfg.trainer
    state = setup.resume_state["monitor"] if setup.resume_state else None
    if not setup.ddp.is_main:
        mon = distributed.FollowerMonitor(on_nonfinite=t.get("on_nonfinite", "stop"))
        if state:
            mon.load_state_dict(state)
        return mon
    sink = None
    if t.get("tensorboard"):
        from netprobe.store import flatten
        from netprobe.tensorboard import TB_DIR, EventWriter

        hparams = flatten(OmegaConf.to_container(cfg, resolve=True))
        sink = EventWriter(setup.run_dir / TB_DIR, hparams=hparams)
    probes, budget = split_budget(cfg.probes)
    return netprobe.attach(
        setup.model,
        setup.run_dir,
        probes=probes,
        probe_batch=setup.probe_batch,
        loss_fn=F.cross_entropy,
        valid_batch=setup.valid_batch,
        optimizer=setup.optimizer,
        info=setup.info,
        seed=cfg.seed,
        flush_every=t.flush_every,
        memory_budget=budget,
        on_nonfinite=t.get("on_nonfinite", "stop"),
        resume=state,
        sink=sink,
    )


def start_progress(setup: Setup, mon: AnyMonitor, first_epoch: int) -> TrainProgress:
    """The console's progress bar (rank 0's), after printing what trains on what."""
    cfg, t, ddp = setup.cfg, setup.cfg.trainer, setup.ddp
    total_steps = t.epochs * len(setup.train_batches)
    progress = TrainProgress(
        setup.run_dir,
        total=min(t.max_steps or total_steps, total_steps),
        epochs=t.epochs,
        first_step=mon.state.step,
        interval_s=t.log_interval_s,
        quiet=not setup.ddp.is_main,
    )
    lines = banner(
        cfg,
        setup.run_dir,
        resumed_at=(first_epoch, mon.state.step) if setup.resume_state else None,
        device=str(setup.device) + (f" × {ddp.world_size} processes" if ddp.enabled else ""),
        parameters=sum(p.numel() for p in setup.model.parameters()),
        samples=(setup.data.x_train.shape[0], setup.data.x_val.shape[0]),
        steps=(len(setup.train_batches), progress.total),
        probes=[p.name + (" (nothing to track)" if p.tracks_nothing else "") for p in mon.probes],
    )
    for line in lines:
        progress.print(line)
    return progress
