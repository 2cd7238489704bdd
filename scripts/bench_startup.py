"""How long the light commands take, start to exit, in fresh processes: `netprobe --help`,
`netprobe ls` on the 20-run sweep of bench_store.py, and `netprobe train --cfg job`.

    python scripts/bench_startup.py              # builds the sweep (a short real run, copied)
    python scripts/bench_startup.py --sweep DIR  # list an existing folder of runs instead
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def seconds(args: list[str], repeats: int) -> tuple[list[float], list[float]]:
    """Wall and CPU (user + system) seconds of `python -m netprobe ARGS` in a fresh process,
    `repeats` times. On a shared machine the CPU time is what idle cores would take."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    wall, cpu = [], []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "netprobe", *args], env=env, capture_output=True, text=True
        )
        wall.append(time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        if done.returncode != 0:
            raise SystemExit(f"netprobe {' '.join(args)} failed:\n{done.stderr}")
    return wall, cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sweep", default=None, help="a folder of runs to list")
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args(argv)
    print(f"# {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f} at start")
    with tempfile.TemporaryDirectory(prefix="netprobe-startup-") as tmp:
        sweep = Path(args.sweep) if args.sweep else None
        if sweep is None:
            sys.path.insert(0, str(ROOT / "scripts"))
            from bench_store import make_sweep

            # ls reads run.json and the config, never the tables: 200 steps stand for 2,000.
            sweep = make_sweep(Path(tmp) / "sweep", args.runs, 200, "cnn")
        runs = sum(1 for _ in sweep.rglob("run.json"))
        cases = {
            "netprobe --help": ["--help"],
            f"netprobe ls ({runs} runs)": ["ls", str(sweep)],
            "netprobe train --cfg job": ["train", "--cfg", "job"],
        }
        for name, command in cases.items():
            wall, cpu = seconds(command, args.repeats)
            print(
                f"{name}: wall median {statistics.median(wall):.2f} s (best {min(wall):.2f} s), "
                f"CPU median {statistics.median(cpu):.2f} s; {args.repeats} runs, load average "
                f"{os.getloadavg()[0]:.1f}"
            )
    print(f"# load average {os.getloadavg()[0]:.2f} at end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
