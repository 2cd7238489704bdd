"""Typed probe options: every declared option refuses a bad value in one line that names the key,
the value and what is valid, accepts the ends of its range, and agrees with conf/probes/*.yaml."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from netprobe.config import conf_dir
from netprobe.errors import ConfigError
from netprobe.probes import PROBES, probe_context
from netprobe.probes.base import ProbeContext
from netprobe.probes.options import Option

COMMON = {"layers", "exclude", "every", "at", "enabled"}
DECLARED = [(probe, option) for probe, cls in PROBES.items() for option in cls.options]


def context() -> ProbeContext:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    return probe_context(model, (x, y), (x, y))


def bad_values(option: Option) -> list:
    """Values the option must refuse: off either end, of the wrong type, or not a choice."""
    if option.choices:
        return [["nope"], 5] if option.type is list else ["nope", 1]
    if option.check is not None:
        return ["wide", [2.0, 1.0]]
    values = [True, "3", math.nan, math.inf]
    if option.type is int:
        values.append(2.5)
    if option.low is not None:
        values.append(option.low - 1)
    if option.high is not None:
        values.append(option.high if option.open else option.high + 1)
    if not option.nullable:
        values.append(None)
    return values


def test_every_probe_declares_typed_options_with_valid_defaults() -> None:
    assert DECLARED, "no probe declares an option"
    for probe, option in DECLARED:
        assert option.read(probe, option.default) == option.default, (probe, option.name)
        assert option.name not in COMMON


@pytest.mark.parametrize(("probe", "option"), DECLARED, ids=[f"{p}.{o.name}" for p, o in DECLARED])
def test_a_bad_value_is_refused_in_one_line_naming_key_value_and_what_is_valid(
    probe: str, option: Option
) -> None:
    for value in bad_values(option):
        with pytest.raises(ConfigError) as err:
            PROBES[probe](context(), **{option.name: value})
        message = str(err.value)
        assert "\n" not in message
        assert f"probes.{probe}.{option.name}" in message, message
        shown = repr(value[0] if isinstance(value, list) and option.choices else value)
        assert shown in message, message
        if option.choices:
            assert ", ".join(option.choices) in message, message
        else:
            assert option.describe() in message, message


@pytest.mark.parametrize(("probe", "option"), DECLARED, ids=[f"{p}.{o.name}" for p, o in DECLARED])
def test_the_ends_of_a_range_and_every_choice_are_accepted(probe: str, option: Option) -> None:
    good = []
    if option.choices:
        good = [[c] for c in option.choices] if option.type is list else list(option.choices)
    elif option.check is None:
        good = [v for v in (option.low, option.high) if v is not None]
        if option.high is not None and option.open:
            good.remove(option.high)
        if option.type is int:
            good = [int(v) for v in good]
    for value in good:
        built = PROBES[probe](context(), **{option.name: value})
        built.close()
        assert built.cfg[option.name] == value


def test_range_and_choices_are_described_as_the_refusal_says() -> None:
    assert Option("k", int, 3, low=1).describe() == "a positive integer"
    assert Option("k", int, 3, low=2).describe() == "an integer ≥ 2"
    assert Option("t", float, 0.0, low=0, high=0.5, open=True).describe() == "a number in [0, 0.5)"
    assert Option("t", float, None, low=0, nullable=True).describe() == "a number ≥ 0 or null"
    assert Option("t", float, 0.0, high=1, open=True).describe() == "a number < 1"
    assert Option("t", float, 0.0).describe() == "a number"
    assert Option("s", list, [], choices=("a", "b")).read("p", "a") == ["a"]
    with pytest.raises(ConfigError, match=r"^probes\.p\.s has 'c'; valid: a, b$"):
        Option("s", list, [], choices=("a", "b")).read("p", ["a", "c"])
    with pytest.raises(ConfigError, match=r"^probes\.p\.m='c'; valid: a, b$"):
        Option("m", str, "a", choices=("a", "b")).read("p", "c")
    with pytest.raises(ConfigError, match=r"^probes\.p\.r=200 must be a number in \[0, 180\]: deg"):
        Option("r", float, 1.0, low=0, high=180, note="degrees").read("p", 200)


@pytest.mark.parametrize("probe", sorted(PROBES))
def test_config_files_and_classes_have_the_same_options_and_defaults(probe: str) -> None:
    entries = OmegaConf.to_container(OmegaConf.load(conf_dir() / "probes" / f"{probe}.yaml"))
    settings = entries[probe]
    options = {option.name: option.default for option in PROBES[probe].options}
    assert set(settings) - COMMON == set(options)
    for name, default in options.items():
        assert settings[name] == default, (probe, name)
