"""No host synchronization on the per-step path: between flushes nothing reads a tensor back.

Reading a value from a GPU tensor (`.item()`, `.tolist()`, `.cpu()`, `float(t)`, `if t:`) waits
for every queued kernel, so one such call per step or per tensor stalls training. The reads are
forbidden while a training step runs (forward, backward, the monitor's calls, probes, the
progress bar); only the optimizer's own step and the monitor's flush may read. A CPU run finds
the calls as well as a GPU run would, since the guard looks at the calls, not at their cost.
"""

from __future__ import annotations

import traceback

import pytest
import torch
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

import netprobe.train as train_module
from netprobe.monitor import Monitor
from netprobe.progress import TrainProgress

READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")


class SyncGuard:
    """Patches the reading methods of torch.Tensor to fail while `forbidden` is set."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.forbidden = False
        self.violations: list[str] = []
        for name in READS:
            monkeypatch.setattr(torch.Tensor, name, self._guard(name, getattr(torch.Tensor, name)))
        self._handles = [
            register_optimizer_step_pre_hook(lambda *_: self._set(False)),
            register_optimizer_step_post_hook(lambda *_: self._set(True)),
        ]

    def _set(self, value: bool) -> None:
        self.forbidden = value

    def _guard(self, name, original):
        def method(tensor, *args, **kwargs):
            if self.forbidden:
                where = "".join(traceback.format_stack(limit=6)[:-1])
                self.violations.append(f"Tensor.{name}() between flushes:\n{where}")
                raise AssertionError(self.violations[-1])
            return original(tensor, *args, **kwargs)

        return method

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
def guard(monkeypatch):
    g = SyncGuard(monkeypatch)
    monkeypatch.setattr(train_module, "train_step", g.wrap(train_module.train_step, True))
    monkeypatch.setattr(TrainProgress, "advance", g.wrap(TrainProgress.advance, True))
    # The one read the console makes: the mean loss, once per shown line (every half second on a
    # terminal, every trainer.log_interval_s seconds off one), never per step.
    monkeypatch.setattr(TrainProgress, "_read_loss", g.wrap(TrainProgress._read_loss, False))
    monkeypatch.setattr(Monitor, "flush", g.wrap(Monitor.flush, False))
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
