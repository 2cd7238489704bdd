"""The monitor's own accounting: probe_overhead and flush_overhead in run.json are measured."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import netprobe
from netprobe.probes.gradients import Gradients


def test_probe_and_flush_overhead_are_the_time_spent_in_them(tmp_path, monkeypatch):
    original = Gradients.after_backward
    spent = []

    def slow(self):
        t = time.perf_counter()
        time.sleep(0.02)
        original(self)
        spent.append(time.perf_counter() - t)

    monkeypatch.setattr(Gradients, "after_backward", slow)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    started = time.perf_counter()
    with netprobe.attach(model, tmp_path, probes=["gradients"], flush_every=5) as mon:
        for _ in range(10):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            mon.after_backward(loss)
            opt.step()
            mon.after_step()
            time.sleep(0.02)  # as much time outside the probes
    wall = time.perf_counter() - started
    info = netprobe.load(tmp_path).info
    # 10 × 20 ms of 10 × 40 ms (plus setup): about half the wall time went into the probe.
    assert info["probe_overhead"] == pytest.approx(sum(spent) / wall, rel=0.1)
    assert 0.3 < info["probe_overhead"] < 0.6
    assert 0 < info["flush_overhead"] < 0.5
