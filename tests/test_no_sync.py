"""No host synchronization on the per-step path: between flushes nothing reads a tensor back.

Reading a value from a GPU tensor (`.item()`, `.tolist()`, `.cpu()`, `float(t)`, `if t:`) waits
for every queued kernel, so one such call per step or per tensor stalls training. So does an op
whose output size comes from the data (mask indexing `x[x != 0]`, `nonzero`, `unique`): the host
waits to learn the size. These are forbidden while a training step runs (forward, backward, the
monitor's calls, probes, the progress bar) and anywhere in probe code (an epoch's capture syncs as
much as a step's); only the optimizer's own step and the monitor's flush may read. A CPU run finds
them as well as a GPU run would, since the guard (conftest's HostReads) looks at the calls, not
at their cost.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import pytest
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

import netprobe.probes
import netprobe.train as train_module
from netprobe import native
from netprobe.monitor import Monitor
from netprobe.progress import TrainProgress

PROBE_CODE = str(Path(netprobe.probes.__file__).parent)


def _in_probe_code() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.startswith(PROBE_CODE):
            return True
        frame = frame.f_back
    return False


class SyncGuard:
    """Fails on a host read while `forbidden` is set or from probe code."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, host_reads) -> None:
        self.forbidden = False
        self.violations: list[str] = []
        self.reads = host_reads(monkeypatch, self._flag)
        self._handles = [
            register_optimizer_step_pre_hook(lambda *_: self._set(False)),
            register_optimizer_step_post_hook(lambda *_: self._set(True)),
        ]

    def _set(self, value: bool) -> None:
        self.forbidden = value

    def _flag(self, what: str) -> None:
        if self.forbidden or _in_probe_code():
            where = "".join(traceback.format_stack(limit=8)[:-2])
            self.violations.append(f"{what} between flushes:\n{where}")
            raise AssertionError(self.violations[-1])

    def wrap(self, function, forbidden: bool):
        """`function` run with reads forbidden (or allowed), restoring the state after."""

        def wrapped(*args, **kwargs):
            before, self.forbidden = self.forbidden, forbidden
            try:
                return function(*args, **kwargs)
            finally:
                self.forbidden = before

        return wrapped

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@pytest.fixture
def guard(monkeypatch, host_reads):
    # The path a GPU run takes: on the CPU the fused kernels and the monitor's curve read the
    # host memory they are in, which costs nothing there.
    monkeypatch.setattr(native, "ENABLED", False)
    g = SyncGuard(monkeypatch, host_reads)
    monkeypatch.setattr(train_module, "train_step", g.wrap(train_module.train_step, True))
    monkeypatch.setattr(TrainProgress, "advance", g.wrap(TrainProgress.advance, True))
    # The one read the console makes: the mean loss, once per shown line (every half second on a
    # terminal, every trainer.log_interval_s seconds off one), never per step.
    monkeypatch.setattr(TrainProgress, "_read_loss", g.wrap(TrainProgress._read_loss, False))
    monkeypatch.setattr(Monitor, "flush", g.wrap(Monitor.flush, False))
    with g.reads:
        yield g
    g.remove()


@pytest.mark.parametrize("model", ["cnn", "mlp"])
def test_training_steps_never_read_a_tensor_back(guard, tiny_run, model):
    run = tiny_run(f"model={model}", "probes=all", "trainer.flush_every=7")
    assert guard.violations == []
    assert run.info["status"] == "completed"
    assert not run.scalars(probe="optim_dynamics").empty


def test_live_tensorboard_reads_nothing_back_between_flushes(guard, tiny_run):
    run = tiny_run("model=mlp", "probes=all", "trainer.flush_every=7", "trainer.tensorboard=true")
    assert guard.violations == []
    assert run.info["status"] == "completed"
    assert list((run.path / "tb").glob("events.out.tfevents.*"))


def test_the_guard_catches_a_probe_that_reads_back(guard, tiny_run, monkeypatch):
    from netprobe.probes.gradients import Gradients

    def syncing(self, state):
        for _, p in self.params:
            p.grad.abs().max().item()

    monkeypatch.setattr(Gradients, "after_backward", syncing)
    with pytest.raises(AssertionError, match=r"Tensor\.item\(\) between flushes"):
        tiny_run("model=cnn", "probes=[gradients]")
    assert guard.violations


def test_probe_options_off_their_defaults_read_nothing_back(guard, tiny_run):
    # The paths the defaults leave out: rwc's elementwise mode and step records, every parameter
    # in weights, both CKA estimators and flattened conv outputs.
    run = tiny_run(
        "model=cnn",
        "probes=all",
        "probes.rwc.mode=elementwise",
        "probes.rwc.every_steps=3",
        "probes.weights.params=all",
        "probes.correlation.cka=both",
        "probes.correlation.conv=flatten",
        "probes.augmentation.conv=flatten",
        "probes.augmentation.samples=12",
    )
    assert guard.violations == []
    assert set(run.scalars(probe="rwc")["metric"]) == {"rwc", "rwc_step"}


def test_the_guard_catches_mask_indexing_in_a_probe(guard, tiny_run, monkeypatch):
    from netprobe.probes import rwc

    def masked(current, previous, mode="l1"):
        prev = previous[0]
        prev[prev != 0].abs().sum()  # its size is the number of nonzeros: the host must wait
        return relative_weight_change(current, previous, mode)

    relative_weight_change = rwc.relative_weight_change
    monkeypatch.setattr(rwc, "relative_weight_change", masked)
    # Called from the epoch's capture, outside the step: probe code may not sync there either.
    with pytest.raises(AssertionError, match=r"aten\.index\.Tensor between flushes"):
        tiny_run("model=mlp", "probes=[rwc]")
