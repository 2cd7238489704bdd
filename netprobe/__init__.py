"""netprobe: train networks with probes attached and see how they learn."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# Imported on first use: `netprobe plot` and `netprobe ls` never load torch for nothing.
_EXPORTS = {
    "Monitor": "netprobe.monitor",
    "attach": "netprobe.monitor",
    "Run": "netprobe.store",
    "load": "netprobe.store",
    "load_runs": "netprobe.query",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'netprobe' has no attribute {name!r}")


__all__ = ["Monitor", "Run", "attach", "load", "load_runs", "__version__"]
