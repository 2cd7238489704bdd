"""netprobe: train networks with probes attached and see how they learn."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Monitor", "Run", "attach", "load", "load_runs", "__version__"]

if TYPE_CHECKING:
    from netprobe.monitor import Monitor, attach
    from netprobe.query import load_runs
    from netprobe.store import Run, load

# Where each public name lives: imported on first use, so that `netprobe --help` and `netprobe ls`
# start without torch (seconds on a small machine).
_HOMES = {
    "Monitor": "netprobe.monitor",
    "attach": "netprobe.monitor",
    "Run": "netprobe.store",
    "load": "netprobe.store",
    "load_runs": "netprobe.query",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'netprobe' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value
