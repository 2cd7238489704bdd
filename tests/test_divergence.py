"""A diverging run stops at its first non-finite loss, keeps what it recorded, and says so."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

import netprobe
from netprobe.cli import main as cli
from netprobe.divergence import NonfiniteWatch
from netprobe.errors import ConfigError, NothingToDo
from tests.gallery import custom

EXPLODING = ["model=cnn", "optim=sgd", "optim.lr=1e6", "trainer.epochs=3"]


def first_bad_step(run) -> int:
    """The reference: the first stored training loss that is NaN or ±inf."""
    losses = run.scalars(probe="train", metric="loss").sort_values("step")
    return next(int(s) for s, v in zip(losses["step"], losses["value"]) if not math.isfinite(v))


def test_watch_finds_the_first_nonfinite_loss():
    watch = NonfiniteWatch()
    for step, value in enumerate([2.0, 1.5, math.nan, 1.0, math.inf, 0.5]):
        watch.observe(torch.tensor(value), step)
        assert watch.first_step == (None if step < 2 else 2)
    assert watch.settle() == 2
    fresh = NonfiniteWatch()
    assert fresh.first_step is None and fresh.settle() is None
    fresh.observe(torch.tensor([1.0, -math.inf]), 7)  # a per-sample loss vector counts too
    assert fresh.settle() == 7
    host = NonfiniteWatch()  # a CPU run's losses, already read as floats
    for step, value in enumerate([2.0, 1.5, -math.inf, math.nan]):
        host.observe(value, step)
        assert host.first_step == (None if step < 2 else 2)
    assert host.settle() == 2


def test_polled_watch_reads_only_copies_that_have_landed(monkeypatch):
    """The GPU path: the host reads the flag only once an event says its copy arrived."""
    landed: list[bool] = []

    class FakeEvent:
        def record(self) -> None: ...

        def query(self) -> bool:
            return landed.pop(0)

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    watch = NonfiniteWatch()
    watch.observe(torch.tensor(1.0), 0)
    watch.polled = True  # as when the loss lives on a GPU
    landed += [False, True]  # the copy made at step 1 is still in flight at step 2
    known = []
    for step, value in [(1, math.nan), (2, 1.0), (3, 1.0)]:
        watch.observe(torch.tensor(value), step)
        known.append(watch.first_step)
    assert known == [None, None, 1] and landed == []
    assert watch.settle() == 1


def test_exploding_learning_rate_stops_the_run_as_diverged(tiny_run):
    run = tiny_run(*EXPLODING)
    first = first_bad_step(run)
    assert run.info["status"] == "diverged"
    assert run.info["first_nonfinite_step"] == first
    assert f"step {first}" in run.info["error"] and f"step {first}" in run.info["stop_reason"]
    # Stopped at once on the CPU, where the flag is read each step; on a GPU the host learns of
    # it a step or two late (never later than the next flush), without waiting for the device.
    lag = 0 if run.info["device"] == "cpu" else 5  # trainer.flush_every in TINY
    assert first + 1 <= run.info["steps_done"] <= first + 1 + lag
    assert run.scalars(probe="train", metric="loss")["step"].max() == run.info["steps_done"] - 1
    assert all(math.isfinite(v) for v in run.info["final"].values())
    # The gradients probe counts the bad entries per tensor at the bad step.
    bad = run.scalars(probe="gradients", metric="nonfinite")
    assert (bad.loc[bad["step"] < first, "value"] == 0).all()
    assert (bad.loc[bad["step"] == first, "value"] > 0).any()


def test_continue_trains_on_and_still_records_the_step(tiny_run):
    run = tiny_run(*EXPLODING, "trainer.on_nonfinite=continue", "trainer.epochs=1", "probes=none")
    first = first_bad_step(run)
    assert run.info["first_nonfinite_step"] == first
    assert run.info["epochs_done"] == 1 and run.info["steps_done"] > first + 1
    assert run.info["status"] == "diverged"  # its last loss is still not a number


def test_continue_marks_a_run_that_recovers_completed(tmp_path):
    model = nn.Linear(3, 2)
    with netprobe.attach(model, tmp_path, probes=[], on_nonfinite="continue") as mon:
        for value in [1.0, math.nan, 0.5]:
            mon.after_backward(torch.tensor(value))
            mon.after_step()
            assert mon.nonfinite_step == (None if value == 1.0 else 1)
    info = netprobe.load(tmp_path).info
    assert info["status"] == "completed" and info["first_nonfinite_step"] == 1


def test_finite_run_records_no_nonfinite_step(tiny_run):
    run = tiny_run("trainer.epochs=1", "trainer.max_steps=2", "probes=none")
    assert run.info["status"] == "completed" and run.info["first_nonfinite_step"] is None


def test_diverged_run_exits_1(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = cli(["train", *EXPLODING, "data=synthetic", "data.num_samples=128",
                "data.image_size=8", "data.probe_size=32", f"hydra.run.dir={run_dir}"])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert "run diverged in" in err and "stopped: non-finite loss at step" in err
    assert netprobe.load(run_dir).info["status"] == "diverged"


def test_bad_on_nonfinite_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="'halt'.*stop or continue"):
        netprobe.attach(nn.Linear(2, 2), tmp_path, probes=[], on_nonfinite="halt")
    assert not any(tmp_path.iterdir())


def strict_json(text: str):
    """JSON as a browser's JSON.parse reads it: a bare NaN or Infinity is an error."""

    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_a_diverged_run_writes_valid_json_everywhere(tmp_path, capsys):
    """Its findings' evidence holds the NaN gradient norm of the step before the loss went
    non-finite: run.json, `ls --format json` and `doctor --format json` write it as null, as
    `query` does. (A model whose first gradient is NaN by construction: how a too-large step
    size blows up differs from one CPU to another.)"""
    run_dir = tmp_path / "run"
    assert cli(["train", *custom("NaNGate"), "optim=sgd", "trainer.epochs=2",
                f"hydra.run.dir={run_dir}"]) == 1  # fmt: skip
    info = strict_json((run_dir / "run.json").read_text())
    evidence = next(f for f in info["findings"] if f["code"] == "diverged")["evidence"]
    assert evidence["first_nonfinite_step"] == 1 and evidence["grad_norm_before"] == [None]
    capsys.readouterr()
    assert cli(["ls", str(run_dir), "--format", "json"]) == 0
    assert strict_json(capsys.readouterr().out)[0]["info"]["findings"] == info["findings"]
    cli(["doctor", str(run_dir), "--format", "json"])
    doctor = strict_json(capsys.readouterr().out)[0]["findings"]
    assert next(f for f in doctor if f["code"] == "diverged")["evidence"] == evidence


def test_a_resumed_run_keeps_its_first_nonfinite_step(tmp_path, train_tiny):
    """`on_nonfinite=continue` trains on past a NaN; resumed with more epochs, the run still
    diverged at that step; with none left, it is left as it was."""
    args = [*EXPLODING, "trainer.on_nonfinite=continue", "trainer.epochs=2", "probes=none",
            "trainer.checkpoint_every=1"]  # fmt: skip
    run_dir = train_tiny(tmp_path / "run", *args)
    first = netprobe.load(run_dir).info["first_nonfinite_step"]
    assert first is not None
    before = (run_dir / "run.json").read_bytes()
    with pytest.raises(NothingToDo, match="diverged after 2 epochs") as left:
        train_tiny(run_dir, *args, "trainer.resume=true")
    # Given continue already, it is told what does train on, not to give continue.
    assert str(left.value).endswith("(a larger trainer.epochs, trainer.max_steps or "
                                    "trainer.target_val_acc trains on)")  # fmt: skip
    assert (run_dir / "run.json").read_bytes() == before
    for epochs in (3, 4):
        train_tiny(run_dir, *args, f"trainer.epochs={epochs}", "trainer.resume=true")
        info = netprobe.load(run_dir).info
        assert info["status"] == "diverged" and info["first_nonfinite_step"] == first
        assert info["error"] == f"non-finite loss at step {first}"
