"""How long `netprobe doctor` takes on many stored runs.

The runs are the store benchmark's (scripts/bench_store.py, `make_sweep`): one tiny CNN run
trained for real with probes=all, copied under other seeds. Then `python -m netprobe doctor
SWEEP --format json` runs in a fresh process, timed (imports included), its findings checked.

    python scripts/bench_doctor.py                      # 1,000 runs of 200 steps
    python scripts/bench_doctor.py --runs 100 --run-steps 2000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_store import make_sweep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--run-steps", type=int, default=200)
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", help="keep (or reuse) the runs in this folder")
    args = parser.parse_args(argv)
    root = Path(args.keep or tempfile.mkdtemp(prefix="netprobe-doctor-"))
    sweep = root / "sweep"
    if not (sweep / str(args.runs - 1) / "run.json").exists():
        make_sweep(sweep, args.runs, args.run_steps, args.model)
    size = sum(p.stat().st_size for p in (sweep / "0").rglob("*.parquet"))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    times = []
    for _ in range(args.repeats):
        load = os.getloadavg()[0]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "netprobe", "doctor", str(sweep), "--format", "json"],
            env=env,
            capture_output=True,
            text=True,
        )
        took = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        # CPU seconds of the command and its workers: what it costs whatever else the cores do.
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        if done.returncode != 0:
            raise SystemExit(f"netprobe doctor failed:\n{done.stderr}")
        report = json.loads(done.stdout)
        assert len(report) == args.runs, len(report)
        times.append(took)
        print(
            f"doctor: {took:.2f} s wall, {cpu:.2f} CPU s, for {args.runs} runs × "
            f"{args.run_steps} steps ({size / 1e6:.2f} MB of Parquet each; "
            f"{os.cpu_count()} cores, load {load:.1f} at start)",
            flush=True,
        )
    print(f"best {min(times):.2f} s, median {sorted(times)[len(times) // 2]:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
