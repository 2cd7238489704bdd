"""How much memory a capture may take: `probes.memory_budget`, checked against each probe's own
estimate (`Probe.memory_estimate`) before anything is written."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, OmegaConf

from netprobe.config import is_number
from netprobe.errors import ConfigError

if TYPE_CHECKING:
    from netprobe.probes.base import Probe

BUDGET_KEY = "memory_budget"
AUTO = "auto"
# `auto`: this share of the memory free when the run starts; training itself needs the rest.
AUTO_SHARE = 0.5
_UNITS = {
    "": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_VALID = f"{AUTO}, a number of bytes, or a size such as 512MB or 2GiB"


def split_budget(probes: Mapping[str, Any] | None) -> tuple[dict[str, Any], Any]:
    """The `probes` config (a composed one resolved into plain containers) without its
    `memory_budget` key, and that key's value (`auto` when absent): the probe groups are the
    other keys."""
    if isinstance(probes, DictConfig):
        probes = OmegaConf.to_container(probes, resolve=True)
    probes = dict(probes or {})
    return probes, probes.pop(BUDGET_KEY, AUTO)


def parse_budget(value: Any) -> int | None:
    """Bytes for a budget given as an integer or a size string (`512MB`, `1.5GiB`); None for
    `auto`. Anything else raises ConfigError."""
    if value is None or value == AUTO:
        return None
    if is_number(value) and value > 0:
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if match and match.group(2).lower() in _UNITS and float(match.group(1)) > 0:
        return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    raise ConfigError(f"probes.{BUDGET_KEY}={value!r} is not valid; expected {_VALID}")


def host_free_bytes() -> int:
    """Memory the host can still give (MemAvailable on Linux, else free physical pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def free_bytes(device: torch.device | str = "cpu") -> int:
    """Free memory where captures run: the host's, and on a GPU the smaller of the GPU's and the
    host's (what a capture records is copied to the host at the next flush)."""
    device = torch.device(device)
    free = host_free_bytes()
    if device.type == "cuda":
        free = min(free, torch.cuda.mem_get_info(device)[0])
    return free


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def check_budget(
    probes: list[Probe], budget: Any = AUTO, device: torch.device | str = "cpu"
) -> None:
    """Raise ConfigError for the first probe whose capture would need more than the budget."""
    limit = parse_budget(budget)
    auto = limit is None
    estimates = [(p, *p.memory_estimate()) for p in probes]
    if not any(need for _, need, _ in estimates):
        return
    if auto:
        limit = int(AUTO_SHARE * free_bytes(device))
    for probe, need, lower in estimates:
        if need > limit:
            given = f"auto, {AUTO_SHARE:.0%} of the free memory" if auto else str(budget)
            raise ConfigError(
                f"probes.{probe.name} needs about {format_bytes(need)} per capture, more than "
                f"probes.{BUDGET_KEY} ({given}: {format_bytes(limit)}); lower {lower}, "
                f"or raise probes.{BUDGET_KEY}"
            )
