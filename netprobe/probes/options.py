"""Typed probe settings: each probe declares its options once, and the base class checks them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from netprobe.config import is_int, is_number
from netprobe.errors import ConfigError


def as_list(value: Any) -> list[Any]:
    """None as [], a string as [it], anything else iterable as a list."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return list(value)


@dataclass(frozen=True)
class Option:
    """A setting a probe takes besides the common ones: its name, type (int, float, str or list)
    and default, and what is valid: `low` ≤ value ≤ `high` (< `high` when `open`), or one of
    `choices` (for a list, each item); None too when `nullable`. A value of another shape has
    its own `check`, described by `expected`; `note` ends the refusal with what the value means."""

    name: str
    type: type
    default: Any
    low: float | None = None
    high: float | None = None
    open: bool = False
    choices: tuple[str, ...] = ()
    nullable: bool = False
    check: Callable[[Any], bool] | None = None
    expected: str = ""
    note: str = ""

    def read(self, probe: str, value: Any) -> Any:
        """`value` if valid (a list option's as a list), else ConfigError: one line naming
        `probes.PROBE.NAME`, the value and the valid choices or range."""
        key = f"probes.{probe}.{self.name}"
        if value is None and self.nullable:
            return None
        if self.type is list and self.choices and isinstance(value, (str, list, tuple)):
            for item in as_list(value):
                if item not in self.choices:
                    raise ConfigError(f"{key} has {item!r}; valid: {', '.join(self.choices)}")
            return as_list(value)
        if self.type is not list and self.choices:
            if value in self.choices:
                return value
            raise ConfigError(f"{key}={value!r}; valid: {', '.join(self.choices)}")
        if self.valid(value):
            return value
        note = f": {self.note}" if self.note else ""
        raise ConfigError(f"{key}={value!r} must be {self.describe()}{note}")

    def valid(self, value: Any) -> bool:
        """Whether a value of an option without choices is of its type and in its range."""
        if self.check is not None:
            return self.check(value)
        typed = is_int(value) if self.type is int else self.type is float and is_number(value)
        if not typed:
            return False
        above = self.high is None or (value < self.high if self.open else value <= self.high)
        return (self.low is None or value >= self.low) and above

    def describe(self) -> str:
        """What is valid, as the refusal says it: `an integer ≥ 2`, `a number in [0, 1)`."""
        if self.expected:
            text = self.expected
        elif self.choices:
            text = f"a list of any of {', '.join(self.choices)}"
        else:
            kind = "an integer" if self.type is int else "a number"
            end = ")" if self.open else "]"
            if self.type is int and self.low == 1 and self.high is None:
                text = "a positive integer"
            elif self.low is not None and self.high is not None:
                text = f"{kind} in [{self.low:g}, {self.high:g}{end}"
            elif self.low is not None:
                text = f"{kind} ≥ {self.low:g}"
            elif self.high is not None:
                text = f"{kind} {'<' if self.open else '≤'} {self.high:g}"
            else:
                text = kind
        return f"{text} or null" if self.nullable else text
