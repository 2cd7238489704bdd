"""What every probe shares: settings it would ignore, and layer regexes, fail as one clear line."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from netprobe.errors import ConfigError
from netprobe.probes import ProbeContext, Schedule, build_probes, probe_context


def context() -> ProbeContext:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,))
    return probe_context(model, (x, y), (x, y))


@pytest.mark.parametrize(
    ("probe", "cfg", "says"),
    [
        ("gradients", {"every": "epoch"}, "records every N steps"),
        ("gradients", {"at": ["end"]}, "records every N steps"),
        ("gradient_flow", {"at": ["start"]}, "records every N steps"),
        ("channels", {"every": 2}, "captures at fixed points"),
        ("weights", {"every": 5}, "captures at fixed points"),
        ("gradients", {"layers": ["0.weight("]}, "not a valid regex"),
        ("weights", {"exclude": ["nope.*"]}, "exclude pattern 'nope.*' matches nothing"),
        ("weights", {"layers": ["nope"]}, "layers pattern 'nope' matches nothing"),
    ],
)
def test_settings_a_probe_would_ignore_are_errors(probe, cfg, says):
    with pytest.raises(ConfigError, match=says) as err:
        build_probes(context(), {probe: cfg})
    assert "\n" not in str(err.value)


def test_capture_probes_take_every_epoch():
    (channels,) = build_probes(context(), {"channels": {"every": "epoch"}})
    assert channels.schedule == Schedule(at=("epoch",))


@pytest.mark.parametrize("probe", ["weights", "rwc"])
def test_saved_state_of_other_parameters_is_refused(probe):
    (built,) = build_probes(context(), {probe: {}})
    state = built.state_dict()
    state["names"] = ["other.weight"]
    with pytest.raises(ConfigError, match="the saved state tracks"):
        built.load_state_dict(state)
