"""How netprobe's commands scale with the number of stored runs: 100 and 1,000 runs.

Four small runs are trained for real (mlp on digits, probes gradients, activations and weights,
one initializer each); each is copied into a sweep folder of its initializer under as many seeds
as needed (run.json, config and Hydra overrides say so), which costs the readers what as many
trainings would. Then, each in a fresh process, timed from the outside (import included):

- `netprobe ls ROOT`
- `netprobe query ROOT SQL`, best validation accuracy per initializer over the seeds
  (every run's scalars and config are read)
- `netprobe.load_runs(ROOT).scalars(metric="val_acc")`
- `netprobe export RUN... --to tensorboard` of 20 runs

    python scripts/bench_runs.py                 # 100 and 1,000 runs
    python scripts/bench_runs.py --sizes 20      # a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

INITS = ("default", "kaiming_normal", "orthogonal", "xavier_uniform")
BASE = ["probes=[gradients,activations,weights]", "trainer.epochs=5", "trainer.device=cpu"]
QUERY = """
SELECT r."init.name" AS init, count(*) AS runs, avg(s.best) AS mean_best, stddev(s.best) AS std
FROM (SELECT run, max(value) AS best FROM scalars WHERE metric = 'val_acc' GROUP BY run) s
JOIN runs r USING (run) GROUP BY ALL ORDER BY mean_best DESC
"""
SCALARS = """
import netprobe, sys, time
t = time.perf_counter()
df = netprobe.load_runs(sys.argv[1]).scalars(metric="val_acc")
print(len(df), df["run"].nunique(), time.perf_counter() - t)
"""
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def netprobe(*args: str) -> list[str]:
    return [sys.executable, "-m", "netprobe", *args]


def train_bases(root: Path) -> dict[str, Path]:
    bases = {}
    for init in INITS:
        run = root / f"base-{init}"
        if not (run / "run.json").exists():  # kept from an earlier --keep run
            cmd = netprobe("train", *BASE, f"init={init}", f"hydra.run.dir={run}")
            subprocess.run(cmd, env=ENV, check=True, capture_output=True)
        bases[init] = run
    return bases


def make_runs(root: Path, bases: dict[str, Path], n: int) -> Path:
    """`n` runs: one sweep folder per initializer, its jobs the base run under other seeds."""
    for i in range(n):
        init = INITS[i % len(INITS)]
        seed = i // len(INITS)
        sweep = root / f"sweep-{init}"
        if not sweep.exists():
            sweep.mkdir(parents=True)
            (sweep / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
        run = sweep / str(seed)
        shutil.copytree(bases[init], run, ignore=shutil.ignore_patterns(".netprobe.lock"))
        info = json.loads((run / "run.json").read_text())
        (run / "run.json").write_text(json.dumps({**info, "seed": seed}, indent=2))
        config = run / ".hydra" / "config.yaml"
        config.write_text(re.sub(r"(?m)^seed: .*$", f"seed: {seed}", config.read_text()))
        (run / ".hydra" / "overrides.yaml").write_text(f"- init={init}\n- seed={seed}\n")
    return root


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(cmd: list[str], repeats: int) -> tuple[tuple[float, float], str]:
    """Median wall and CPU seconds (all threads) of `repeats` runs of `cmd`, and its stdout. On a
    shared machine the CPU seconds say more: wall time grows with everyone else's load."""
    walls, cpus, out = [], [], ""
    for _ in range(repeats):
        t, c = time.perf_counter(), _cpu()
        done = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
        walls.append(time.perf_counter() - t)
        cpus.append(_cpu() - c)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr}")
        out = done.stdout
    return (statistics.median(walls), statistics.median(cpus)), out


def measure(root: Path, n: int, repeats: int, scratch: Path) -> dict[str, float]:
    ls, _ = timed(netprobe("ls", str(root)), repeats)
    query, table = timed(netprobe("query", str(root), QUERY, "--format", "csv"), repeats)
    assert sum(int(line.split(",")[1]) for line in table.splitlines()[1:]) == n, table
    scalars, out = timed([sys.executable, "-c", SCALARS, str(root)], repeats)
    rows, runs, inside = out.split()
    assert int(runs) == n, out
    jobs = sorted(root.glob("sweep-*/*/run.json"))[:20]
    out_dir = scratch / f"tb-{n}"
    export, _ = timed(
        netprobe(
            "export", *(str(j.parent) for j in jobs), "--to", "tensorboard", "--out", str(out_dir)
        ),
        1,
    )
    import_only, _ = timed([sys.executable, "-c", "import netprobe.cli, netprobe.query"], repeats)
    return {
        "runs": n,
        "import": import_only,
        "ls": ls,
        "query": query,
        "scalars": scalars,
        "scalars_inside_s": float(inside),
        "scalar_rows": int(rows),
        "export20": export,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000", help="comma-separated numbers of runs")
    parser.add_argument("--repeats", type=int, default=3, help="timings per command (median)")
    parser.add_argument("--keep", default=None, help="build the runs in this folder and keep them")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"# {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f} at start")
    with tempfile.TemporaryDirectory(prefix="netprobe-runs-") as tmp:
        scratch = Path(args.keep) if args.keep else Path(tmp)
        t = time.perf_counter()
        bases = train_bases(scratch / "bases")
        print(f"# trained {len(bases)} base runs in {time.perf_counter() - t:.1f} s")
        results = []
        for n in sizes:
            t = time.perf_counter()
            shutil.rmtree(scratch / f"runs-{n}", ignore_errors=True)
            shutil.rmtree(scratch / f"tb-{n}", ignore_errors=True)
            root = make_runs(scratch / f"runs-{n}", bases, n)
            size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
            print(f"# {n} runs: {size / 1e6:.0f} MB in {time.perf_counter() - t:.1f} s")
            results.append(measure(root, n, args.repeats, scratch))
    print("\nwall s (CPU s, all threads), each a fresh process, `import netprobe` included")
    print("\n| runs | import only | `ls` | aggregate `query` | `load_runs().scalars()` |", end="")
    print(" `export` 20 runs |")
    print("|---:|---:|---:|---:|---:|---:|")
    cell = lambda t: f"{t[0]:.1f} ({t[1]:.1f})"  # noqa: E731
    for r in results:
        print(
            f"| {r['runs']:,} | {cell(r['import'])} | {cell(r['ls'])} | {cell(r['query'])} | "
            f"{cell(r['scalars'])} | {cell(r['export20'])} |"
        )
    print(f"# load average {os.getloadavg()[0]:.2f} at end")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
