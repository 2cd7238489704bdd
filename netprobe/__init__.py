"""netprobe: train networks with probes attached and see how they learn."""

__version__ = "0.1.0"

from netprobe.monitor import Monitor, attach  # noqa: E402
from netprobe.query import load_runs  # noqa: E402
from netprobe.store import Run, load  # noqa: E402

__all__ = ["Monitor", "Run", "attach", "load", "load_runs", "__version__"]
