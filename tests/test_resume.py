"""Resuming (netprobe/resume.py): an interrupted run continued to the end equals an unbroken one."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import open_dict

import netprobe
from netprobe.cli import main as cli
from netprobe.config import compose
from netprobe.errors import ConfigError, NothingToDo
from netprobe.probes import PROBES, Option, Probe, Schedule, StepState
from netprobe.train import train

TINY = ["data=synthetic", "data.num_samples=128", "data.image_size=8", "data.batch_size=32",
        "data.probe_size=32", "trainer.flush_every=5"]  # fmt: skip
# 103 training samples in batches of 32: 4 steps per epoch (the last one short), 12 in three.
SETUP = [*TINY, "model=cnn", "model.width=4", "model.hidden=16", "trainer.epochs=3",
         "trainer.checkpoint_every=1", "probes.gradient_flow.every=2",
         # Every probe that carries state from one step or epoch to the next.
         "probes=[gradients,optim_dynamics,gradient_flow,weights,rwc,activations]"]  # fmt: skip
INTERRUPT_AT = 6  # in the middle of epoch 1 (the second), after a flush at step 5


class Interrupt(Probe):
    """Presses Ctrl-C at a given step, once: the run's second epoch is cut short."""

    name = "interrupt"
    default_schedule = Schedule(every=1)
    options = (Option("at_step", int, None, nullable=True),)
    armed = False

    def after_backward(self, state: StepState) -> None:
        if Interrupt.armed and state.step == self.cfg["at_step"]:
            Interrupt.armed = False
            raise KeyboardInterrupt


def config(*extra: str):
    cfg = compose([*SETUP, *extra])
    with open_dict(cfg):
        cfg.probes.interrupt = {"at_step": INTERRUPT_AT}
    return cfg


def stored(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    run = netprobe.load(run_dir)
    keys = ["step", "epoch", "probe", "layer", "metric"]
    scalars = run.scalars()
    # Throughput is wall-clock dependent: its rows are compared, not its values.
    scalars["value"] = scalars["value"].mask(scalars["metric"] == "samples_per_s")
    scalars = scalars.sort_values(keys).reset_index(drop=True)
    matrices = run.matrices().sort_values(["step", "epoch", "probe", "name", "row", "col"])
    hists = run.histograms().sort_values(["step", "epoch", "probe", "layer", "source"])
    hists = hists.assign(edges=hists["edges"].map(list), counts=hists["counts"].map(list))
    return scalars, matrices.reset_index(drop=True), hists.reset_index(drop=True)


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run never stopped, to compare with."""
    run_dir = tmp_path_factory.mktemp("whole") / "run"
    PROBES["interrupt"] = Interrupt
    try:
        assert train(config(), run_dir) == "completed"
    finally:
        del PROBES["interrupt"]
    return run_dir


@pytest.mark.parametrize("stop", ["ctrl-c", "max_steps"])
def test_interrupted_run_resumed_equals_an_unbroken_one(whole, stop, tmp_path, monkeypatch):
    monkeypatch.setitem(PROBES, "interrupt", Interrupt)
    broken = tmp_path / "broken"
    if stop == "ctrl-c":
        Interrupt.armed = True
        with pytest.raises(KeyboardInterrupt):
            train(config(), broken)
    else:  # stopped for good mid-epoch, then given more steps
        assert train(config(f"trainer.max_steps={INTERRUPT_AT}"), broken) == "completed"
    info = json.loads((broken / "run.json").read_text())
    assert info["status"] == ("interrupted" if stop == "ctrl-c" else "completed")
    assert info["steps_done"] == INTERRUPT_AT
    last = INTERRUPT_AT if stop == "ctrl-c" else INTERRUPT_AT - 1
    assert netprobe.load(broken).scalars(metric="loss")["step"].max() == last

    assert train(config("trainer.resume=true"), broken) == "completed"
    (a_scalars, a_matrices, a_hists), (b_scalars, b_matrices, b_hists) = (
        stored(whole),
        stored(broken),
    )
    keys = ["step", "epoch", "probe", "layer", "metric"]
    assert not b_scalars.duplicated(keys).any()
    assert b_scalars[b_scalars["metric"] == "loss"]["step"].tolist() == list(range(12))
    assert set(b_scalars["probe"]) >= {"optim_dynamics", "rwc", "weights", "activations"}
    pd.testing.assert_frame_equal(a_scalars, b_scalars)  # the same steps and the same values
    pd.testing.assert_frame_equal(a_matrices, b_matrices)
    assert len(b_hists) > 0
    pd.testing.assert_frame_equal(a_hists, b_hists)

    a, b = netprobe.load(whole).info, netprobe.load(broken).info
    assert b["status"] == "completed" and b["error"] is None and len(b["resumed_at"]) == 1
    assert b["started_at"] == info["started_at"]
    for key in ("steps_done", "epochs_done", "best_val_acc", "final"):
        assert a[key] == b[key], key


def test_a_run_cut_by_max_steps_in_its_last_epoch_trains_on_without_it(
    whole, tmp_path, monkeypatch
):
    """epochs_done counts the last epoch, cut short: the run is not finished for a resume that
    lifts max_steps, which trains that epoch whole, as the unbroken run did."""
    monkeypatch.setitem(PROBES, "interrupt", Interrupt)
    broken = tmp_path / "broken"
    assert train(config("trainer.max_steps=10"), broken) == "completed"  # epoch 2 is steps 8-11
    info = netprobe.load(broken).info
    assert (info["steps_done"], info["epochs_done"]) == (10, 3)
    assert train(config("trainer.resume=true"), broken) == "completed"
    pd.testing.assert_frame_equal(stored(whole)[0], stored(broken)[0])
    assert netprobe.load(broken).info["steps_done"] == 12
    with pytest.raises(NothingToDo):  # now it is finished
        train(config("trainer.resume=true"), broken)
    # max_steps at the end of the last epoch: every epoch whole, nothing to train, no file touched.
    edge = tmp_path / "edge"
    assert train(config("trainer.max_steps=12"), edge) == "completed"
    before = {p: p.read_bytes() for p in sorted(edge.rglob("*")) if p.is_file()}
    with pytest.raises(NothingToDo):
        train(config("trainer.resume=true"), edge)
    assert {p: p.read_bytes() for p in sorted(edge.rglob("*")) if p.is_file()} == before


def test_resume_continues_after_the_last_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    train(compose([*SETUP, "trainer.epochs=1"]), run_dir)
    assert train(compose([*SETUP, "trainer.epochs=2", "trainer.resume=true"]), run_dir)
    run = netprobe.load(run_dir)
    assert run.scalars(metric="loss")["step"].tolist() == list(range(8))
    assert run.scalars(metric="val_acc")["epoch"].tolist() == [0, 1]
    assert run.info["epochs_done"] == 2 and run.info["status"] == "completed"


def test_resume_starts_an_empty_directory_and_needs_a_checkpoint(tmp_path, capsys):
    # Nothing there yet: a fresh start (a sweep sent with trainer.resume=true from the outset).
    fresh = tmp_path / "fresh"
    assert train(compose([*SETUP, "trainer.epochs=1", "trainer.resume=true"]), fresh)
    assert "starting it" in capsys.readouterr().err
    assert netprobe.load(fresh).info["status"] == "completed"
    run_dir = tmp_path / "run"
    train(compose([*SETUP, "trainer.epochs=1", "trainer.checkpoint_every=0"]), run_dir)
    with pytest.raises(ConfigError, match="last.pt does not exist"):
        train(compose([*SETUP, "trainer.resume=true"]), run_dir)
    # On the command line the run's directory is required, before Hydra makes a new one.
    assert cli(["train", "trainer.resume=true"]) == 2
    assert "hydra.run.dir" in capsys.readouterr().err
    assert cli(["train", "-m", "seed=0,1", "trainer.resume=true"]) == 2
    assert "hydra.sweep.dir" in capsys.readouterr().err


def test_a_run_from_before_optimizer_recipes_resumes_and_a_changed_recipe_does_not(tmp_path):
    """Runs written before conf/optim held `_target_` recipes lack those keys: their optimizer
    was the one `optim.name` names, so they may resume; a run whose recipe differs may not."""
    from omegaconf import OmegaConf

    from netprobe import resume

    run_dir = tmp_path / "run"
    overrides = [*TINY, "model=cnn", "model.width=4", "model.hidden=16", "probes=none"]
    train(compose([*overrides, "trainer.epochs=1", "trainer.checkpoint_every=1"]), run_dir)
    path = run_dir / ".hydra" / "config.yaml"
    stored = OmegaConf.load(path)
    for key in ("_target_", "_partial_", "lr_schedulers"):
        stored.optim.pop(key)
    OmegaConf.save(stored, path)
    later = compose([*overrides, "trainer.epochs=2", "trainer.resume=true"])
    resume.check(later, run_dir)
    stored.optim._target_ = "torch.optim.AdamW"
    OmegaConf.save(stored, path)
    with pytest.raises(ConfigError, match=r"optim._target_=torch.optim.AdamW \(the run's\)"):
        resume.check(later, run_dir)


def test_a_run_from_before_probes_took_enabled_resumes(tmp_path):
    """Runs written before each probe's config held `enabled` ran every probe they list: they
    may resume with it true, not with it false."""
    from omegaconf import OmegaConf

    from netprobe import resume

    run_dir = tmp_path / "run"
    overrides = [*TINY, "model=cnn", "model.width=4", "model.hidden=16", "probes=[gradients]"]
    train(compose([*overrides, "trainer.epochs=1", "trainer.checkpoint_every=1"]), run_dir)
    path = run_dir / ".hydra" / "config.yaml"
    stored = OmegaConf.load(path)
    stored.probes.gradients.pop("enabled")
    OmegaConf.save(stored, path)
    resume.check(compose([*overrides, "trainer.epochs=2", "trainer.resume=true"]), run_dir)
    off = compose([*overrides, "trainer.epochs=2", "trainer.resume=true",
                   "probes.gradients.enabled=false"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"probes.gradients.enabled=\(absent\) \(the run's\)"):
        resume.check(off, run_dir)


def test_a_resume_with_nothing_to_train_leaves_every_file_as_it_was(tmp_path, capsys):
    """A finished run resumed as it was, or with a smaller max_steps, exits 0 untouched (a sweep
    sent again resumes its unfinished jobs only); an unfinished one given fewer steps than its
    checkpoint keeps is refused, untouched too."""
    run_dir = tmp_path / "run"
    args = ["train", *SETUP, f"hydra.run.dir={run_dir}"]
    assert cli(args) == 0

    def files() -> dict[Path, bytes]:
        return {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}

    before = files()
    for extra in ([], ["trainer.max_steps=2"]):
        capsys.readouterr()
        assert cli([*args, "trainer.resume=true", *extra]) == 0
        assert "nothing to resume" in capsys.readouterr().err
        assert files() == before
    info = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**info, "status": "interrupted"}))
    before = files()
    assert cli([*args, "trainer.resume=true", "trainer.max_steps=2"]) == 2
    assert "trainer.max_steps=2 is fewer than the 12 steps" in capsys.readouterr().err
    assert files() == before


def test_a_resume_stopped_before_it_takes_the_run_leaves_it_as_it_was(
    tmp_path, capsys, monkeypatch
):
    """Ctrl-C while the resume still builds its model and data: exit 130, and neither the old
    run's summary, printed as if this process had ended it, nor a line in its train.log."""
    run_dir = tmp_path / "run"
    args = ["train", *SETUP, f"hydra.run.dir={run_dir}", "trainer.max_steps=5"]
    assert cli(args) == 0
    files = {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    capsys.readouterr()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("netprobe.train.build", interrupted)
    assert cli([*args, "trainer.resume=true", "trainer.max_steps=12"]) == 130
    assert "run completed" not in capsys.readouterr().err
    assert {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()} == files


def test_a_run_that_reached_its_target_accuracy_is_finished(tmp_path, capsys):
    """Stopped early at trainer.target_val_acc, a run sent again as it was (a sweep resent) is
    left as it was; a higher target trains on."""
    run_dir = tmp_path / "run"
    args = ["train", *SETUP, "trainer.target_val_acc=0.01", f"hydra.run.dir={run_dir}"]
    assert cli(args) == 0
    assert netprobe.load(run_dir).info["epochs_done"] == 1
    before = {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    capsys.readouterr()
    assert cli([*args, "trainer.resume=true"]) == 0
    assert "nothing to resume" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()} == before
    assert cli([*args, "trainer.resume=true", "trainer.target_val_acc=null"]) == 0
    assert netprobe.load(run_dir).info["epochs_done"] == 3


def test_bookkeeping_may_change_on_resume_and_the_seed_may_not(tmp_path):
    """Logging, checkpointing and the doctor's thresholds never define the stored rows."""
    from netprobe import resume

    run_dir = tmp_path / "run"
    overrides = [*TINY, "model=cnn", "model.width=4", "model.hidden=16", "probes=none"]
    train(compose([*overrides, "trainer.epochs=1", "trainer.checkpoint_every=1"]), run_dir)
    later = [*overrides, "trainer.epochs=2", "trainer.resume=true", "trainer.log_interval_s=5"]
    resume.check(compose([*later, "trainer.checkpoint_every=2", "doctor.dead_frac=0.5"]), run_dir)
    with pytest.raises(ConfigError, match=r"seed=0 \(the run's\) vs 1"):
        resume.check(compose([*later, "seed=1"]), run_dir)
    # A probe the run did not select is named once, not by each of its keys.
    with pytest.raises(ConfigError) as refused:
        resume.check(compose([*later, "probes=[weights]"]), run_dir)
    assert "differs in probes.weights=(absent) (the run's) vs (set)." in str(refused.value)


class Poison(Probe):
    """Turns a weight into NaN after a given step: the next step's loss is non-finite."""

    name = "poison"
    default_schedule = Schedule(every=1)
    options = (Option("at_step", int, None, nullable=True),)

    def after_step(self, state: StepState) -> None:
        if state.step == self.cfg["at_step"]:
            next(p for p in self.ctx.model.parameters() if p.dim() > 1).data.fill_(float("nan"))


def test_a_diverged_run_sent_again_is_left_as_it_was(tmp_path, monkeypatch):
    """A run that diverged (on_nonfinite=stop) would only train from its last.pt into the same
    non-finite loss: sent again, with more epochs too, it is left byte for byte, as a finished
    run is; on_nonfinite=continue trains on past it."""
    monkeypatch.setitem(PROBES, "poison", Poison)

    def poisoned(*extra: str):
        cfg = compose([*SETUP, *extra])
        with open_dict(cfg):
            cfg.probes.poison = {"at_step": 5}  # epoch 1; last.pt holds epoch 0
        return cfg

    run_dir = tmp_path / "run"
    assert train(poisoned(), run_dir) == "diverged"
    assert (run_dir / "checkpoints" / "last.pt").exists()
    before = {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    for extra in ([], ["trainer.epochs=5"]):
        with pytest.raises(NothingToDo, match="diverged .*on_nonfinite=continue trains on"):
            train(poisoned("trainer.resume=true", *extra), run_dir)
        assert {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()} == before
    assert train(poisoned("trainer.resume=true", "trainer.on_nonfinite=continue"), run_dir)
    assert netprobe.load(run_dir).info["steps_done"] == 12
