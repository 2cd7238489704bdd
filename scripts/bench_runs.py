"""How netprobe's commands scale with the number of stored runs: 100 and 1,000 runs.

Four small runs are trained for real (mlp on digits, probes gradients, activations and weights,
one initializer each); each is copied into a sweep folder of its initializer under as many seeds
as needed (run.json, config and Hydra overrides say so), which costs the readers what as many
trainings would. Then each of these runs in a fresh process, timed (wall and CPU seconds) after
its imports, which are timed on their own (they are the same for every command and every size):

- `netprobe ls ROOT`
- `netprobe query ROOT SQL`, best validation accuracy per initializer over the seeds
  (every run's scalars and config are read)
- `netprobe.load_runs(ROOT).scalars(metric="val_acc")`
- `netprobe export RUN... --to tensorboard` of 20 runs

    python scripts/bench_runs.py                 # 100 and 1,000 runs
    python scripts/bench_runs.py --sizes 20 --repeats 1   # a smoke test
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
# Times one command inside a fresh process, after the imports: what the command itself costs.
RUNNER = """
import contextlib, io, json, sys, time
import netprobe, netprobe.cli, netprobe.query
what, args = sys.argv[1], sys.argv[2:]
t, c = time.perf_counter(), time.process_time()
with contextlib.redirect_stdout(io.StringIO()) as out:
    if what == "scalars":
        df = netprobe.load_runs(args[0]).scalars(metric="val_acc")
        result = [len(df), int(df["run"].nunique())]
    else:
        result = netprobe.cli.main(args)
took = {"wall": time.perf_counter() - t, "cpu": time.process_time() - c}
print(json.dumps({**took, "result": result, "out": out.getvalue()}))
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


def import_seconds(repeats: int) -> tuple[float, float]:
    """Median wall and CPU seconds of a process that only imports netprobe's command line."""
    walls, cpus = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), _cpu()
        subprocess.run([sys.executable, "-c", "import netprobe.cli, netprobe.query"], env=ENV)
        walls.append(time.perf_counter() - t)
        cpus.append(_cpu() - c)
    return statistics.median(walls), statistics.median(cpus)


def timed(what: str, args: list[str], repeats: int) -> tuple[tuple[float, float], dict]:
    """Median wall and CPU seconds (all threads) of `repeats` runs of one command, each in a
    fresh process after its imports, and the last run's result. On a shared machine the CPU
    seconds say more: wall time grows with everyone else's load."""
    walls, cpus = [], []
    for _ in range(repeats):
        done = subprocess.run(
            [sys.executable, "-c", RUNNER, what, *args], env=ENV, capture_output=True, text=True
        )
        if done.returncode != 0:
            raise SystemExit(f"{what} {' '.join(args)} failed:\n{done.stderr}")
        result = json.loads(done.stdout.splitlines()[-1])
        walls.append(result["wall"])
        cpus.append(result["cpu"])
    return (statistics.median(walls), statistics.median(cpus)), result


def measure(root: Path, n: int, repeats: int, scratch: Path) -> dict:
    ls, _ = timed("cli", ["ls", str(root)], repeats)
    query, result = timed("cli", ["query", str(root), QUERY, "--format", "csv"], repeats)
    table = result["out"].splitlines()[1:]
    assert sum(int(line.split(",")[1]) for line in table) == n, result
    scalars, result = timed("scalars", [str(root)], repeats)
    assert result["result"][1] == n, result
    jobs = [str(j.parent) for j in sorted(root.glob("sweep-*/*/run.json"))[:20]]
    out = scratch / f"tb-{n}"
    export, _ = timed("cli", ["export", *jobs, "--to", "tensorboard", "--out", str(out)], 1)
    return {"runs": n, "ls": ls, "query": query, "scalars": scalars, "export20": export}


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
    imports = import_seconds(args.repeats)
    print("\nCPU s (wall s) of each command after its imports; medians of", args.repeats)
    print("\n| runs | `ls` | aggregate `query` | `load_runs().scalars()` | `export` 20 runs |")
    print("|---:|---:|---:|---:|---:|")
    cell = lambda t: f"{t[1]:.2f} ({t[0]:.2f})"  # noqa: E731
    for r in results:
        print(
            f"| {r['runs']:,} | {cell(r['ls'])} | {cell(r['query'])} | {cell(r['scalars'])} | "
            f"{cell(r['export20'])} |"
        )
    print(f"\nimporting netprobe's command line: {cell(imports)}")
    results.append({"import": imports})
    print(f"# load average {os.getloadavg()[0]:.2f} at end")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
