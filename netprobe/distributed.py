"""Training in several processes with DDP, as `torchrun` starts them: one model, an equal share of
each global batch per rank, gradients all-reduced during backward. Only rank 0 writes the run; the
others attach a `FollowerMonitor`."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from netprobe.errors import ConfigError
from netprobe.lifecycle import status_for
from netprobe.probes.base import StepState


@dataclass(frozen=True)
class DDPContext:
    """Which rank this process is, of how many (torchrun's RANK, WORLD_SIZE, LOCAL_RANK);
    `enabled` only under torchrun, else rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> DDPContext:
    """What torchrun's environment says about this process (no process group is started).

    A job of a submitit launcher (SLURM, local) with several tasks counts too: submitit's own
    helper writes the same variables from the job's SLURM environment.
    """
    env = os.environ
    if "RANK" not in env and env.get("SUBMITIT_EXECUTOR"):
        _from_submitit()
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return DDPContext()
    return DDPContext(
        rank=int(env["RANK"]),
        world_size=int(env["WORLD_SIZE"]),
        local_rank=int(env.get("LOCAL_RANK", 0)),
        enabled=True,
    )


def _from_submitit() -> None:
    from submitit import JobEnvironment
    from submitit.helpers import TorchDistributedEnvironment

    if JobEnvironment().num_tasks > 1:
        # Each task keeps every GPU visible and takes cuda:LOCAL_RANK, as under torchrun.
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def setup(device: torch.device) -> tuple[DDPContext, torch.device]:
    """Join the process group when started by torchrun (once per process): NCCL on GPUs, gloo
    on the CPU. Each rank gets its own GPU, `cuda:LOCAL_RANK`."""
    ddp = launched()
    if not ddp.enabled:
        return ddp, device
    if device.type == "cuda":
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", ddp.local_rank + 1))
        if per_node > torch.cuda.device_count():
            raise ConfigError(
                f"{per_node} processes per node but {torch.cuda.device_count()} GPU(s) visible: "
                "start at most one process per GPU, or train on the CPU with trainer.device=cpu"
            )
        device = torch.device("cuda", ddp.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=ddp.rank, world_size=ddp.world_size)
        atexit.register(_leave)
    return ddp, device


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, ddp: DDPContext, device: torch.device) -> nn.Module:
    """The module the training step calls: DDP around `model` under torchrun, else `model`.
    Probes keep `model` itself, so their names carry no `module.` prefix and their own forward
    passes (on rank 0 only) never wait for the other ranks."""
    if not ddp.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def from_main(value: Any, ddp: DDPContext) -> Any:
    """Rank 0's `value`, on every rank (the run directory, the validation results)."""
    if not ddp.enabled:
        return value
    box = [value if ddp.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(values: torch.Tensor, ddp: DDPContext) -> torch.Tensor:
    """The mean of a tensor over all ranks (the loss and accuracy of the whole global batch)."""
    if not ddp.enabled:
        return values
    total = values.detach().clone()
    dist.all_reduce(total)
    return total / ddp.world_size


def hydra_overrides() -> list[str]:
    """Hydra overrides for ranks other than 0: their Hydra output goes to a throwaway folder, so
    one run directory is made per run, not one per rank (the timestamps may differ)."""
    ddp = launched()
    if not ddp.enabled or ddp.is_main:
        return []
    scratch = tempfile.mkdtemp(prefix=f"netprobe-rank{ddp.rank}-")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    return [f"hydra.run.dir={scratch}", f"hydra.sweep.dir={scratch}", "hydra.output_subdir=null"]


class FollowerMonitor:
    """What ranks other than 0 attach: it counts steps and epochs as `Monitor` does, so every
    rank stops at the same point, and records and writes nothing."""

    def __init__(self, on_nonfinite: str = "stop") -> None:
        self.state = StepState()
        self.probes: list[Any] = []
        self.best_val_acc: float | None = None
        self.on_nonfinite = on_nonfinite
        self.nonfinite_step: int | None = None  # rank 0 watches the (all-reduced) loss
        self.status = "running"

    def after_backward(self, loss: torch.Tensor, **_: Any) -> None: ...

    def after_step(self) -> None:
        self.state.step += 1

    def end_epoch(self, val_loss: Any = None, val_acc: Any = None) -> None:
        self.state.epoch += 1

    def latest(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.state.step, "epoch": self.state.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state.step, self.state.epoch = state["step"], state["epoch"]

    def stop(self, reason: str) -> None: ...

    def close(self, status: str = "completed", error: str | None = None, **_: Any) -> None:
        self.status = status

    def __enter__(self) -> FollowerMonitor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(*status_for(exc_type, exc))
