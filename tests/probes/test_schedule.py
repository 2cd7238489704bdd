"""Schedules as values: parsing, which hooks the runner calls at which step and point, the last
capture kept across a resume, and the `netprobe probes` listing."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from netprobe.cli import main as cli
from netprobe.errors import ConfigError
from netprobe.probes import Probe, ProbeRunner, Schedule, StepState, probe_context
from netprobe.probes.schedule import listing


class Log(Probe):
    """Writes down every hook call as (hook, step, epoch, point)."""

    name = "log"
    measures = "nothing"
    default_schedule = Schedule(every=3, at=("start", "epoch"), arm=True)

    def __init__(self, ctx, **cfg) -> None:
        super().__init__(ctx, **cfg)
        self.calls: list[tuple[str, int, int, str | None]] = []

    def _log(self, hook: str, state: StepState) -> None:
        self.calls.append((hook, state.step, state.epoch, state.point))

    def start(self, state):
        self._log("start", state)

    def after_backward(self, state):
        self._log("after_backward", state)

    def arm(self, state):
        self._log("arm", state)

    def after_step(self, state):
        self._log("after_step", state)

    def capture(self, state):
        self._log("capture", state)


def make(state: StepState | None = None, **cfg) -> tuple[Log, ProbeRunner]:
    state = state or StepState()
    ctx = probe_context(nn.Linear(2, 2), (torch.zeros(2, 2), torch.zeros(2, dtype=torch.long)))
    probe = Log(ctx, **cfg)
    return probe, ProbeRunner([probe], state)


def train(runner: ProbeRunner, steps: int) -> None:
    for _ in range(steps):
        runner.after_backward(torch.zeros(()))
        runner.after_step()


def test_parse_takes_defaults_and_every_epoch() -> None:
    default = Schedule(every=1, at=("epoch",), arm=True)
    assert Schedule.parse("p", default, {}) == default
    assert Schedule.parse("p", default, {"every": 4}) == Schedule(4, ("epoch",), arm=True)
    assert Schedule.parse("p", default, {"at": "end"}) == Schedule(1, ("end",), arm=True)
    assert Schedule.parse("p", default, {"every": "epoch"}) == Schedule(None, ("epoch",), True)


@pytest.mark.parametrize(
    "default, cfg, message",
    [
        (Schedule(every=1), {"every": 0}, "probes.p.every=0 must be a positive number of steps"),
        (Schedule(every=1), {"every": "often"}, "or 'epoch'"),
        (Schedule(at=("end",)), {"at": ["later"]}, "probes.p.at has 'later'; valid: start,"),
        (Schedule(at=("end",)), {"every": 2}, "p captures at fixed points, not every N steps"),
        (Schedule(at=("end",)), {"every": "start"}, "p captures at fixed points, not every"),
        (Schedule(every=1), {"at": ["end"]}, "p records every N steps, not at ['end']"),
    ],
)
def test_parse_refuses_settings_the_probe_would_ignore(default, cfg, message) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Schedule.parse("p", default, cfg)


def test_records_and_words() -> None:
    assert [t for t in range(8) if Schedule(every=3).records(t)] == [0, 3, 6]
    # rwc's every_steps: after every k-th step.
    assert [t for t in range(8) if Schedule(every=3, phase=2).records(t)] == [2, 5]
    assert not Schedule(at=("end",)).records(0)
    assert Schedule(every=1).describe() == "every step"
    assert Schedule(10, arm=True).describe() == "every 10 steps, armed the step before"
    assert Schedule(3, ("epoch",), phase=2).describe() == "every 3 steps (steps 2, 5, …); at epoch"
    assert Schedule(at=("start", "end")).describe() == "at start, end"


def test_runner_calls_each_hook_when_the_schedule_says() -> None:
    probe, runner = make()
    runner.start()
    train(runner, 4)
    runner.end_epoch()
    train(runner, 3)
    runner.end_epoch()
    runner.end()
    hooks = [(h, s) for h, s, _, _ in probe.calls]
    assert hooks == [
        ("start", 0),
        ("capture", 0),
        ("arm", 0),
        ("after_backward", 0),
        ("after_step", 0),
        ("arm", 2),
        ("after_backward", 3),
        ("after_step", 3),
        ("capture", 4),
        ("arm", 5),
        ("after_backward", 6),
        ("after_step", 6),
        ("capture", 7),
    ]
    points = [(h, e, p) for h, _, e, p in probe.calls if h in ("start", "capture")]
    assert points == [("start", 0, "start"), ("capture", 0, "start"), ("capture", 0, "epoch"),
                      ("capture", 1, "epoch")]  # fmt: skip
    assert (runner.state.step, runner.state.epoch) == (7, 2)


def test_one_capture_per_step_even_across_a_resume() -> None:
    probe, runner = make(at=["epoch", "end"])
    runner.start()
    train(runner, 2)
    runner.end_epoch()
    saved = runner.state_dict()
    # The run resumed from the epoch's checkpoint: its end capture is the epoch's, already taken.
    again, resumed = make(at=["epoch", "end"])
    resumed.load_state_dict(saved)
    resumed.resume()
    resumed.end()
    assert again.calls == []  # and step 2 is not recorded: nothing to arm
    # Without the saved last capture, the end would capture again at the same step.
    fresh, runner = make(at=["epoch", "end"])
    runner.load_state_dict({**saved, "probes": {}})
    runner.end()
    assert [(h, s, e, p) for h, s, e, p in fresh.calls] == [("capture", 2, 0, "end")]


def test_an_earlier_versions_checkpoint_still_resumes() -> None:
    """Its monitor state held each probe's state and last capture step side by side."""
    probe, runner = make(at=["epoch", "end"])
    runner.load_state_dict(
        {"step": 8, "epoch": 2, "probes": {"log": {"state": {}, "last_capture": 8}}}
    )
    runner.end()
    assert probe.last_capture == (8, None) and probe.calls == []


def test_cli_lists_each_enabled_probe_with_its_schedule(capsys) -> None:
    code = cli(["probes", "probes=[gradients,gradient_flow,rwc]", "probes.gradient_flow.every=3",
                "probes.rwc.every_steps=5", "model=mlp"])  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert [line.split()[0] for line in out] == ["gradients", "gradient_flow", "rwc"]
    assert "every step" in out[0] and "grad_l2_total" in out[0]
    assert "every 3 steps, armed the step before" in out[1]
    assert "every 5 steps (steps 4, 9, …); at epoch" in out[2] and "rwc_step every 5" in out[2]


def test_cli_refuses_a_bad_schedule_in_one_line(capsys) -> None:
    assert cli(["probes", "probes.gradients.every=0"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "netprobe: probes.gradients.every=0 must be a positive number of steps or 'epoch'"
    )
    assert cli(["probes", "probes=none"]) == 0
    assert "no probes enabled" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["-m", "--cfg"])
def test_cli_refuses_train_flags_in_one_line(capsys, flag: str) -> None:
    assert cli(["probes", flag, "seed=1,2"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        f"netprobe: netprobe probes takes overrides (key=value), not '{flag}': it lists the "
        "probes of one config, so give one value per key (no -m sweep)"
    )


def test_cli_names_the_choices_for_several_values(capsys) -> None:
    """Hydra's "Ambiguous value" keeps its hints on later lines; the one line gives them."""
    assert cli(["probes", "seed=1,2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("netprobe: seed=1,2 gives several values")
    assert "-m" in err and "key=[a,b]" in err and "key='a,b'" in err


def test_a_disabled_probe_is_not_attached(capsys) -> None:
    """Every probe's config takes `enabled` (SPEC §5); false leaves the probe out."""
    args = ["probes", "probes=all", "probes.rwc.enabled=false", "probes.gradients.enabled=false"]
    assert cli(args) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert "rwc" not in names and "gradients" not in names and "weights" in names
    assert cli(["probes", "probes.gradients.enabled=maybe"]) == 2
    assert capsys.readouterr().err.strip() == (
        "netprobe: probes.gradients.enabled='maybe'; valid: true, false"
    )


@pytest.mark.parametrize("every", ["2", "start", "[1]"])
def test_rwc_every_names_what_rwc_takes(capsys, every: str) -> None:
    """rwc records at epoch ends (`every: epoch`), and every N steps only through every_steps."""
    assert cli(["probes", "probes=[rwc]", f"probes.rwc.every={every}"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "probes.rwc.every=" in err and "valid: epoch" in err
    assert "probes.rwc.every_steps=N" in err and "probes.rwc.at" not in err


def test_every_epoch_with_another_at_is_refused_not_replaced(capsys) -> None:
    """`every: epoch` means `at: [epoch]`: an `at` beside it that says otherwise is an error."""
    args = ["probes", "probes=[weights]", "+probes.weights.every=epoch"]
    assert cli([*args, "probes.weights.at=[end]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "probes.weights.at=['end'] with probes.weights.every=epoch" in err[0]
    assert cli([*args, "probes.weights.at=[epoch]"]) == 0  # the same thing said twice


def test_rwc_refuses_an_added_at_rather_than_ignore_it(capsys) -> None:
    assert cli(["probes", "probes=[rwc]", "+probes.rwc.at=[end]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "probes.rwc.at=" in err[0] and "every_steps=N" in err[0], err


def test_listing_aligns_name_schedule_and_measures() -> None:
    probe, _ = make()
    assert listing([probe]) == [
        "log  every 3 steps, armed the step before; at start, epoch  nothing"
    ]
    assert listing([]) == []


def test_the_runner_calls_only_hooks_a_probe_has_and_those_set_on_it() -> None:
    """A probe without per-step hooks of its own is left out of the step's loops (each call of
    the base class's no-op costs µs of a small model's step); a hook set on the probe itself
    before the runner is made counts as its own."""

    class Quiet(Probe):
        name = "quiet"
        measures = "nothing"
        default_schedule = Schedule(every=1)

    ctx = probe_context(nn.Linear(2, 2), (torch.zeros(2, 2), torch.zeros(2, dtype=torch.long)))
    quiet, told = Quiet(ctx), Quiet(ctx)
    seen: list[int] = []
    told.after_step = lambda state: seen.append(state.step)
    runner = ProbeRunner([quiet, told], StepState())
    assert runner._reading == [] and runner._stepping == [told]
    train(runner, 3)
    assert seen == [0, 1, 2]


@pytest.mark.parametrize(
    "overrides",
    [["probes=[channels,gradients]"], ["probes=[gradients]", "probes.gradients.exclude=[.*]"]],
    ids=["no conv in an mlp", "exclude of everything"],
)
def test_a_probe_left_nothing_to_track_says_so(overrides, capsys) -> None:
    """Attached, it records nothing; its listing used to read as if it would record its usual."""
    assert cli(["probes", *overrides]) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    empty = "channels" if "channels" in overrides[0] else "gradients"
    assert lines[empty].split("  ")[-1].strip().startswith("nothing to track on this model")
    assert all("nothing" not in text for name, text in lines.items() if name != empty)
