"""How fast the store takes scalars in, and how long `netprobe plot` takes.

1. Scalar rows per second through the real path: `Recorder.scalars` with device tensors every
   step, `Recorder.drain` (one host copy, Arrow tables) and `RunWriter.append` (a Parquet part)
   every `--flush-every` steps. The per-step blocks have the shapes probes=all records on a
   ResNet-18 (21 weight tensors): train curves, gradients [21, 4] + total, optim_dynamics
   [21, 10], gradient_flow [21, 1] twice every 10 steps: 292 rows per step on average.
2. `netprobe plot` on a sweep of 20 runs × 2,000 steps with probes=all. One run is trained for
   real (`netprobe.train.train` on tiny 8×8 synthetic images: the model's layers are real, every
   probe runs at its default schedule, 20 epochs of 100 steps); the other 19 are copies of its
   tables under other seeds (their run.json and config say so), which costs the plotter what 19
   more trainings would. Then `python -m netprobe plot SWEEP` runs in a fresh process, timed,
   and once more on the unchanged folder (which draws nothing: the inputs are in its manifest).
3. `netprobe plot` of one `probes=all` cnn run of 3 epochs on the default synthetic data, drawn
   and then re-plotted unchanged. Targets on 2 idle cores: ≤ 10 s, ≤ 20 s for the sweep, ≤ 2 s for
   a second plot.

    python scripts/bench_store.py            # both
    python scripts/bench_store.py --quick    # a smoke test (200-step runs, 3 of them)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

import netprobe
from netprobe.config import compose
from netprobe.lifecycle import claim_run_dir
from netprobe.probes import StepState
from netprobe.recorder import Recorder
from netprobe.store import RunWriter, write_json
from netprobe.train import train

LAYERS = [f"layer{i}.weight" for i in range(21)]


def scalar_rows_per_second(steps: int, flush_every: int, device: torch.device) -> dict:
    """Rows/s through Recorder → drain → RunWriter.append, and the time spent in each."""
    progress = StepState()
    record = Recorder(progress)
    n = len(LAYERS)
    g = torch.Generator(device=device).manual_seed(0)
    rand = lambda *shape: torch.rand(*shape, generator=g, device=device)  # noqa: E731
    # Fresh device tensors every step, as probes make them; drawn ahead so only the store is timed.
    pool = [(rand(n, 4), rand(1, 1), rand(n, 10), rand(n, 1), rand(n, 1)) for _ in range(16)]
    scalar = rand(1, 1)
    with tempfile.TemporaryDirectory(prefix="netprobe-store-") as tmp:
        writer = RunWriter(tmp, {}, lock=claim_run_dir(tmp))
        t_record = t_drain = t_write = 0.0
        rows = 0
        for step in range(steps):
            grads, total, dyn, w_grad, out_grad = pool[step % len(pool)]
            t0 = time.perf_counter()
            for metric in ("loss", "acc", "grad_l2_total"):
                record.scalars("train", [""], [metric], scalar)
            record.scalars("train", [""], ["lr"], 0.01)
            record.scalars("gradients", LAYERS, ["l1", "l2", "mean_abs", "max_abs"], grads)
            record.scalars("gradients", [""], ["grad_l2_total"], total)
            record.scalars("optim_dynamics", LAYERS, [f"m{j}" for j in range(10)], dyn)
            rows += 4 + 4 * n + 1 + 10 * n
            if step % 10 == 0:
                record.scalars("gradient_flow", LAYERS, ["w_grad_l2"], w_grad)
                record.scalars("gradient_flow", LAYERS, ["out_grad_l2"], out_grad)
                rows += 2 * n
            progress.step += 1
            t1 = time.perf_counter()
            t_record += t1 - t0
            if progress.step % flush_every == 0 or step == steps - 1:
                tables = record.drain()
                t2 = time.perf_counter()
                for name, table in tables.items():
                    writer.append(name, table)
                t3 = time.perf_counter()
                t_drain += t2 - t1
                t_write += t3 - t2
        written = netprobe.load(tmp).scalars()
        assert len(written) == rows, (len(written), rows)
    total = t_record + t_drain + t_write
    return {
        "rows": rows,
        "seconds": total,
        "rows_per_s": rows / total,
        "record_s": t_record,
        "drain_s": t_drain,
        "write_s": t_write,
        "rows_per_s_flush_only": rows / (t_drain + t_write),
    }


def make_sweep(root: Path, runs: int, steps: int, model: str) -> Path:
    """One tiny real run of `steps` steps with probes=all, copied to `runs` seeds."""
    steps_per_epoch = 100 if steps >= 200 else max(steps // 2, 1)
    overrides = [
        f"model={model}",
        "data=synthetic",
        "data.image_size=8",
        "data.batch_size=16",
        f"data.num_samples={int(steps_per_epoch * 16 / 0.8)}",
        "data.probe_size=32",
        "probes=all",
        f"trainer.epochs={-(-steps // steps_per_epoch)}",
        f"trainer.max_steps={steps}",
        "trainer.device=cpu",
        "seed=0",
    ]
    first = root / "0"
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only wait on each other
    try:
        train(compose(overrides), first)
    finally:
        torch.set_num_threads(threads)
    print(f"  trained run 0 ({steps} steps, probes=all) in {time.perf_counter() - t0:.1f} s")
    for seed in range(1, runs):
        run = root / str(seed)
        shutil.copytree(first, run)
        config = OmegaConf.load(run / ".hydra" / "config.yaml")
        config.seed = seed
        OmegaConf.save(config, run / ".hydra" / "config.yaml")
        info = json.loads((run / "run.json").read_text())
        write_json(run / "run.json", {**info, "seed": seed})
    return root


def single_run(root: Path) -> Path:
    """One `probes=all` cnn run of 3 epochs on the default synthetic data, trained for real."""
    overrides = ["model=cnn", "data=synthetic", "probes=all", "trainer.epochs=3"]
    t0 = time.perf_counter()
    train(compose([*overrides, "trainer.device=cpu", "seed=0"]), root / "single")
    print(f"  trained the probes=all cnn run (3 epochs) in {time.perf_counter() - t0:.1f} s")
    return root / "single"


def plot_seconds(sweep: Path, out: Path, jobs: int | None = None) -> float:
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    more = ["--jobs", str(jobs)] if jobs else []
    t0 = time.perf_counter()
    cpu0 = _children_cpu()
    done = subprocess.run(
        [sys.executable, "-m", "netprobe", "plot", str(sweep), "--out", str(out), *more],
        env=env,
        capture_output=True,
        text=True,
    )
    took = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"netprobe plot failed:\n{done.stderr}")
    # CPU time of the plot and its workers: on a machine shared with other work, CPU seconds
    # over the cores used bound what the wall time would be on idle cores.
    cpu, load = _children_cpu() - cpu0, os.getloadavg()[0]
    print(f"    ({took:.1f} s wall, {cpu:.1f} s CPU, load average {load:.1f})")
    return took


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20_000, help="steps recorded for rows/s")
    parser.add_argument("--flush-every", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runs", type=int, default=20, help="runs in the plotted sweep")
    parser.add_argument("--run-steps", type=int, default=2000, help="steps per plotted run")
    parser.add_argument("--model", default="cnn", help="model of the plotted runs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-plot", action="store_true")
    parser.add_argument("--skip-store", action="store_true", help="skip the rows/s measurement")
    parser.add_argument("--jobs", type=int, default=None, help="`netprobe plot --jobs`")
    parser.add_argument("--keep", default=None, help="keep the sweep in this folder")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.runs, args.run_steps = 1000, 1, 3, 200
    device = torch.device(args.device)
    load = os.getloadavg()[0]
    print(f"# {os.cpu_count()} cores; load average {load:.2f} at start")
    results: dict = {"load_start": load}
    if not args.skip_store:
        store = [
            scalar_rows_per_second(args.steps, args.flush_every, device)
            for _ in range(args.repeats)
        ]
        best = max(store, key=lambda r: r["rows_per_s"])
        median = statistics.median(r["rows_per_s"] for r in store)
        results["store"] = store
        print(
            f"store: {median:,.0f} scalar rows/s (median of {len(store)}; "
            f"best {best['rows_per_s']:,.0f})"
            f" over {best['rows']:,} rows, flush every {args.flush_every} steps; "
            f"of the best: record {best['record_s']:.2f} s, drain {best['drain_s']:.2f} s, "
            f"write {best['write_s']:.2f} s"
        )
    if not args.skip_plot:
        keep = Path(args.keep) if args.keep else None
        with tempfile.TemporaryDirectory(prefix="netprobe-sweep-") as tmp:
            root = keep or Path(tmp)
            single = single_run(root)
            first = plot_seconds(single, root / "single-figures", args.jobs)
            again = plot_seconds(single, root / "single-figures", args.jobs)
            results["plot_single"] = {"seconds": first, "again_seconds": again}
            print(
                f"plot: {first:.1f} s for `netprobe plot` on one probes=all cnn run of 3 epochs; "
                f"{again:.1f} s to plot it again unchanged"
            )
            sweep = make_sweep(root / "sweep", args.runs, args.run_steps, args.model)
            seconds = plot_seconds(sweep, root / "figures", args.jobs)
            again = plot_seconds(sweep, root / "figures", args.jobs)
            files = sum(1 for _ in (root / "figures").rglob("*.png"))
            size = sum(p.stat().st_size for p in (sweep / "0").rglob("*.parquet"))
        results["plot"] = {
            "runs": args.runs,
            "steps": args.run_steps,
            "seconds": seconds,
            "again_seconds": again,
        }
        print(
            f"plot: {seconds:.1f} s for `netprobe plot` on {args.runs} runs × "
            f"{args.run_steps} steps"
            f" ({args.model}, probes=all; {size / 1e6:.1f} MB of Parquet per run; {files} PNGs);"
            f" {again:.1f} s to plot it again unchanged"
        )
    results["load_end"] = os.getloadavg()[0]
    print(f"# load average {results['load_end']:.2f} at end")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
