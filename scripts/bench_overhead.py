"""What probes cost per training step: variants timed side by side in one process.

(a) a plain hand-written loop (forward, loss, zero_grad, backward, step);
(b) netprobe's own training step (`netprobe.train.train_step`) with probes=none;
(g) the `gradients` probe alone, every step;
(c) the per-step probes: gradients and optim_dynamics, every step;
(d) probes=all at default schedules (whatever conf/probes/all.yaml lists);
and a reference, "one pass": reading every tracked gradient and weight once
(`torch._foreach_norm` over them, the tensors (c) tracks), timed where the probes read: in the
step, right after backward, in a copy of (a) that takes its turns in the same rounds. That is
what one read costs a step; the same read repeated in a tight loop, printed beside it, is
cheaper (2.7x on the small mlp), for a backward leaves PyTorch's code cold in the caches.

Each variant has its own model (same initial weights) and optimizer and sees the same batches,
held on the device. After a warm-up the variants take turns, a block of `--block` steps each in a
shuffled order, so that the drifting load of a shared machine hits all variants alike. The step
ratio is the median over rounds of a variant's block time / (a)'s block time in the same round;
"passes" is the median of (variant − (a)) / the median pass: the added time in reads of the tracked
tensors. Flushes (every `--flush-every` steps, trainer.flush_every's default) and epoch-end
captures (`at: epoch`, then one flush) are timed apart and amortized: flush / flush_every and
captures / `--epoch-steps`, added to the step ratio in the last column, the overhead a run sees.

    python scripts/bench_overhead.py        # cnn and the mlp cases on CPU; resnet18 with a GPU
    python scripts/bench_overhead.py --cases cnn --epoch-steps 26 --variants a,b,d
    python scripts/bench_overhead.py --device cuda --cases resnet18 --precision bf16
    python scripts/bench_overhead.py --quick         # smoke test: a few seconds
    python scripts/bench_overhead.py --threads 1 --clock cpu   # a shared machine: CPU time
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import netprobe
from netprobe.config import compose
from netprobe.data import build_data
from netprobe.init import initialize
from netprobe.models import build_model
from netprobe.probes import PROBES, probe_context
from netprobe.probes.memory import split_budget
from netprobe.setup import build_optimizer, resolve_device
from netprobe.train import train_step

# Case: config overrides, the epoch length (steps) its epoch captures are amortized over, and
# (rounds, steps per block) by default: fewer for the slow cases.
DIGITS_EPOCH = 23  # digits: 1,437 training images at batch 64
CASES: dict[str, tuple[list[str], int, tuple[int, int]]] = {
    "cnn": (
        [
            "model=cnn",
            "data=synthetic",
            "data.image_size=32",
            "data.channels=3",
            "data.batch_size=128",
            "data.num_samples=2560",
        ],
        391,  # CIFAR-10's 50,000 images at batch 128
        (12, 3),
    ),
    "mlp": (["model=mlp", "data=digits"], DIGITS_EPOCH, (40, 10)),
    # Deep and wide MLPs on digits: depth × width hidden layers.
    **{
        f"mlp{depth}x{width}": (
            ["model=mlp", "data=digits", f"model.hidden=[{','.join([str(width)] * depth)}]"],
            DIGITS_EPOCH,
            rounds,
        )
        for depth, width, rounds in (
            (16, 64, (30, 10)),
            (64, 64, (20, 5)),
            (16, 256, (20, 5)),
            (16, 1024, (8, 2)),
        )
    },
    "resnet18": (
        [
            "model=resnet18",
            "data=synthetic",
            "data.image_size=32",
            "data.channels=3",
            "data.batch_size=256",
            "data.num_samples=5120",
        ],
        196,  # CIFAR-10 at batch 256
        (40, 10),
    ),
}
VARIANTS = {
    "a": "plain loop",
    "b": "probes=none",
    "g": "gradients",
    "c": "gradients+optim_dynamics",
    "d": "probes=all",
}
PASS = "one pass"
# What a block is timed with: wall time, or with --clock cpu the process's CPU time, which a
# shared machine's other work does not inflate (one torch thread, CPU only: it counts every
# thread's time and none of a GPU's).
clock = time.perf_counter
READS = 10  # reads in a row, for the one pass's time with its code hot


@dataclass
class Variant:
    key: str
    step: Callable[[torch.Tensor, torch.Tensor], None]
    monitor: netprobe.Monitor | None = None
    blocks: list[float] = field(default_factory=list)  # seconds per step, one per round
    flushes: list[float] = field(default_factory=list)  # seconds per flush
    epoch_capture: list[float] = field(default_factory=list)  # seconds per end_epoch
    tracked: tuple[int, int] | None = None  # the one-pass reference: tensors, elements
    read: Callable[[], None] | None = None  # the one-pass reference's read
    reads: list[float] = field(default_factory=list)  # its in-step reads, seconds each


def probe_specs() -> dict[str, dict[str, Any]]:
    """Each variant's probes, composed from the config groups as `netprobe train` would."""
    specs = {}
    for key, override in (
        ("b", "probes=none"),
        ("g", "probes=[gradients]"),
        ("c", "probes=[gradients,optim_dynamics]"),
        ("d", "probes=all"),
    ):
        # Without memory_budget: the probe groups, as `netprobe train` passes them to attach.
        specs[key], _ = split_budget(compose([override]).probes)
    for key in ("g", "c"):
        specs[key] = {name: {**cfg, "every": 1} for name, cfg in specs[key].items()}
    return specs


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_variants(
    case: str, device: torch.device, precision: str, out: Path, flush_every: int, keys: list[str]
) -> tuple[list[Variant], list[tuple[torch.Tensor, torch.Tensor]], Any]:
    overrides, _, _ = CASES[case]
    cfg = compose([*overrides, "seed=0"])
    torch.manual_seed(0)
    data = build_data(cfg.data)
    base = build_model(cfg.model)
    initialize(base, cfg.init)
    base.to(device)
    bs = cfg.data.batch_size
    n = len(data.x_train) // bs
    batches = [
        (
            data.normalize(data.x_train[i * bs : (i + 1) * bs].to(device)),
            data.y_train[i * bs : (i + 1) * bs].to(device),
        )
        for i in range(n)
    ]
    probe_x = data.normalize(data.x_train[: cfg.data.probe_size].to(device))
    probe_batch = (probe_x, data.y_train[: cfg.data.probe_size].to(device))
    valid_x = data.normalize(data.x_val[: cfg.data.probe_size].to(device))
    valid_batch = (valid_x, data.y_val[: cfg.data.probe_size].to(device))
    dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(precision)
    autocast = (
        (lambda: torch.autocast(device.type, dtype=dtype))
        if dtype is not None
        else contextlib.nullcontext
    )
    specs = probe_specs()
    variants = []
    for key in keys:
        model = copy.deepcopy(base)
        model.train()
        optimizer, _ = build_optimizer(model, cfg.optim)
        if key == "a":
            variants.append(Variant(key, plain_step(model, optimizer, autocast)))
            # The reference: the same loop on a copy of its own, which reads once after each
            # backward, where the probes read, and times that read.
            model = copy.deepcopy(base)
            model.train()
            optimizer, _ = build_optimizer(model, cfg.optim)
            tensors = tracked_tensors(model)
            tracked = (len(tensors), sum(p.numel() for p in tensors))
            reference = Variant(PASS, lambda x, y: None, tracked=tracked)
            reference.read = one_pass(tensors)
            in_step = timed(reference.read, device, reference.reads)
            reference.step = plain_step(model, optimizer, autocast, in_step)
            variants.append(reference)
            continue
        mon = netprobe.attach(
            model,
            out / f"{case}-{key}",
            probes=specs[key],
            probe_batch=probe_batch,
            valid_batch=valid_batch,
            optimizer=optimizer,
            seed=0,
            flush_every=flush_every,
        )
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "16")

        def step(x, y, model=model, optimizer=optimizer, scaler=scaler, mon=mon):
            train_step(model, x, y, optimizer, scaler, autocast, mon)

        variants.append(Variant(key, step, mon))
    return variants, batches, cfg


def plain_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    autocast: Callable[[], contextlib.AbstractContextManager],
    after_backward: Callable[[], None] | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """A hand-written training step: forward, loss, zero_grad, backward, (after_backward,) step."""

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with autocast():
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward()
        optimizer.step()

    return step


def tracked_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """The weights (c) tracks."""
    gradients = PROBES["gradients"](probe_context(model, None), **probe_specs()["c"]["gradients"])
    return [p for _, p in gradients.params]


def one_pass(tensors: list[torch.Tensor]) -> Callable[[], None]:
    """One read of the tracked tensors' gradients and weights: the unit of the "passes" column."""

    def read() -> None:
        grads = [p.grad for p in tensors if p.grad is not None]
        torch._foreach_norm(grads + [p.detach() for p in tensors])

    return read


def timed(
    read: Callable[[], None], device: torch.device, seconds: list[float]
) -> Callable[[], None]:
    """`read`, its time appended to `seconds` at each call (the device's queue drained first)."""

    def call() -> None:
        synchronize(device)
        t0 = clock()
        read()
        synchronize(device)
        seconds.append(clock() - t0)

    return call


def repeated_read(read: Callable[[], None], device: torch.device, times: int = 21) -> float:
    """Seconds per read when READS are made in a row, the median of `times`: what a read costs
    with PyTorch's code hot in the caches, as it never is right after a backward."""
    seconds = []
    for _ in range(times):
        synchronize(device)
        t0 = clock()
        for _ in range(READS):
            read()
        synchronize(device)
        seconds.append((clock() - t0) / READS)
    return statistics.median(seconds)


def capture_costs(case: str, device: torch.device, repeats: int) -> str:
    """Each capture of probes=all (its `capture()` alone, on the probe batch) in units of one
    forward pass of the probe batch in eval mode, timed alternately in the same process."""
    with tempfile.TemporaryDirectory(prefix="netprobe-bench-") as tmp:
        return _capture_costs(case, device, repeats, Path(tmp))


def _capture_costs(case: str, device: torch.device, repeats: int, out: Path) -> str:
    variants, _, _ = build_variants(case, device, "32", out, 200, ["d"])
    mon = variants[0].monitor
    model, (x, _) = mon.model, mon.ctx.probe_batch

    def forward() -> None:
        model.eval()
        with torch.no_grad():
            model(x)
        model.train()
        synchronize(device)

    lines = [
        f"{case}: epoch and end captures, probe batch {len(x)}, median of {repeats}",
        "",
        "| probe | at | ms | forwards of the probe batch |",
        "|---|---|---:|---:|",
    ]
    forward()
    for probe in mon.probes:
        if not probe.schedule.at:
            continue
        times, units = [], []
        for _ in range(repeats):
            t0 = clock()
            forward()
            t1 = clock()
            probe.capture(mon.state)
            synchronize(device)
            t2 = clock()
            mon.record.drain()
            times.append(t2 - t1)
            units.append((t2 - t1) / (t1 - t0))
        lines.append(
            f"| {probe.name} | {', '.join(probe.schedule.at)} "
            f"| {1e3 * statistics.median(times):.1f} "
            f"| {statistics.median(units):.1f} |"
        )
    mon.close()
    return "\n".join(lines)


def timed_flushes(v: Variant, device: torch.device) -> None:
    """Time the variant's flushes (drain to the host, Parquet write) apart from its steps."""
    mon = v.monitor
    flush = mon.flush

    def timed() -> None:
        synchronize(device)  # the queued training work is not the flush's cost
        t0 = clock()
        flush()
        v.flushes.append(clock() - t0)

    mon.flush = timed


def run_case(
    case: str,
    device: torch.device,
    precision: str,
    rounds: int,
    block_steps: int,
    flush_every: int,
    warmup_rounds: int,
    epoch_steps: int | None,
    keys: list[str],
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="netprobe-bench-") as tmp:
        variants, batches, cfg = build_variants(
            case, device, precision, Path(tmp), flush_every, keys
        )
        for v in variants:
            if v.monitor is not None:
                timed_flushes(v, device)

        def block(v: Variant, start: int) -> float:
            flushed = sum(v.flushes)
            synchronize(device)
            t0 = clock()
            for i in range(start, start + block_steps):
                x, y = batches[i % len(batches)]
                v.step(x, y)
            synchronize(device)
            # Flushes are counted apart, amortized over flush_every steps.
            return (clock() - t0 - (sum(v.flushes) - flushed)) / block_steps

        # Every variant sees the same batches in the same order.
        for r in range(warmup_rounds):
            for v in variants:
                block(v, r * block_steps)
        for v in variants:
            v.flushes.clear()
            v.reads.clear()
        order = random.Random(0)
        for r in range(rounds):
            # A shuffled order: no variant always runs right after the same other one, and none
            # always flushes first in the rounds where flushes fall (a rotation repeats there),
            # when the code the others' flushes run next is cold.
            for v in order.sample(variants, len(variants)):
                v.blocks.append(block(v, (warmup_rounds + r) * block_steps))
        for v in variants:
            if v.monitor is None:
                continue
            for i in range(3):
                # A step first: a probe captures at most once per step.
                v.step(*batches[i % len(batches)])
                synchronize(device)
                t0 = clock()
                v.monitor.end_epoch()  # epoch captures, then a flush (timed apart)
                synchronize(device)
                v.epoch_capture.append(clock() - t0 - v.flushes.pop())
            v.monitor.close()
        plain = variants[0].blocks
        plain_s = statistics.median(plain)
        reference = next(v for v in variants if v.key == PASS)
        pass_s = statistics.median(reference.reads)
        hot_s = repeated_read(reference.read, device)  # type: ignore[arg-type]
        epoch_steps = epoch_steps or CASES[case][1]
        rows = []
        for v in variants:
            if v.key == PASS:
                continue
            step_ratio = statistics.median(t / a for t, a in zip(v.blocks, plain))
            added = statistics.median(t - a for t, a in zip(v.blocks, plain)) / pass_s
            flush = statistics.median(v.flushes) if v.flushes else 0.0
            capture = statistics.median(v.epoch_capture) if v.epoch_capture else 0.0
            rows.append(
                {
                    "variant": v.key,
                    "what": VARIANTS[v.key],
                    "ms_per_step": 1e3 * statistics.median(v.blocks),
                    "ms_per_step_min": 1e3 * min(v.blocks),
                    "step_ratio": step_ratio,
                    "passes": added,
                    "flush_ms": 1e3 * flush,
                    "flushes_timed": len(v.flushes),
                    "epoch_capture_ms": 1e3 * capture,
                    "ratio": step_ratio + (flush / flush_every + capture / epoch_steps) / plain_s,
                    "probes": v.monitor.writer.info["probes"] if v.monitor else [],
                    "probe_overhead": (
                        v.monitor.writer.info.get("probe_overhead") if v.monitor else None
                    ),
                }
            )
    return {
        "case": case,
        "device": str(device),
        "precision": precision,
        "batch_size": cfg.data.batch_size,
        "optim": cfg.optim.name,
        "rounds": rounds,
        "block_steps": block_steps,
        "flush_every": flush_every,
        "epoch_steps": epoch_steps,
        "tracked": reference.tracked,
        "pass_ms": 1e3 * pass_s,
        "hot_pass_ms": 1e3 * hot_s,
        "variants": rows,
    }


def table(result: dict[str, Any]) -> str:
    head = (
        f"{result['case']} on {result['device']}, precision {result['precision']}, batch "
        f"{result['batch_size']}, {result['optim']}: {result['rounds']} rounds of "
        f"{result['block_steps']} steps per variant; a flush every {result['flush_every']} steps, "
        f"an epoch = {result['epoch_steps']} steps; one pass (reading {result['tracked'][0]} "
        f"tracked tensors, {result['tracked'][1]:,} elements, gradients and weights, once after "
        f"backward) = {result['pass_ms']:.3f} ms ({result['hot_pass_ms']:.3f} ms when repeated "
        "in a tight loop)"
    )
    lines = [
        head,
        "",
        "| variant | ms/step | step ratio | added, passes | flush, ms | epoch captures, ms "
        "| **ratio to (a)** |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["variants"]:
        added = "" if r["variant"] == "a" else f"{r['passes']:.1f}"
        lines.append(
            f"| ({r['variant']}) {r['what']} | {r['ms_per_step']:.2f} | {r['step_ratio']:.3f} "
            f"| {added} | {r['flush_ms']:.1f} | {r['epoch_capture_ms']:.1f} "
            f"| **{r['ratio']:.3f}** |"
        )
    for r in result["variants"]:
        if r["variant"] == "d":
            lines += ["", f"(d) ran: {', '.join(r['probes']) or 'none'}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda")
    parser.add_argument("--cases", default=None, help=f"comma-separated: {', '.join(CASES)}")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated; (a) always runs"
    )
    parser.add_argument("--precision", default="32", choices=["32", "bf16", "16"])
    parser.add_argument("--rounds", type=int, default=None, help="timed blocks per variant")
    parser.add_argument("--block", type=int, default=None, help="steps per timed block")
    parser.add_argument("--flush-every", type=int, default=200, help="trainer.flush_every")
    parser.add_argument("--epoch-steps", type=int, default=None, help="steps per epoch")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--clock", default="wall", choices=["wall", "cpu"], help="cpu: process CPU time (CPU only)"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke test: tiny blocks")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument(
        "--captures", type=int, default=0, help="only time each capture of probes=all, N times"
    )
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        if device.type != "cpu":
            parser.error(f"--clock cpu times the host only; use --clock wall on {device}")
        global clock
        clock = time.process_time
    cases = args.cases.split(",") if args.cases else [c for c in CASES if c != "resnet18"]
    if not args.cases and device.type == "cuda":
        cases = ["resnet18", "cnn", "mlp"]
    for case in cases:
        if case not in CASES:
            parser.error(f"unknown case {case!r}; valid cases: {', '.join(CASES)}")
    keys = ["a", *(k for k in args.variants.split(",") if k != "a")]
    for key in keys:
        if key not in VARIANTS:
            parser.error(f"unknown variant {key!r}; valid variants: {', '.join(VARIANTS)}")
    flush_every = 5 if args.quick else args.flush_every
    warmup = 1 if args.quick else 3
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    machine = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads"
    )
    print(
        f"# {machine}; torch {torch.__version__}; {args.clock} clock; "
        f"load average {load:.2f} at start"
    )
    if args.captures:
        for case in cases:
            print(capture_costs(case, device, args.captures), flush=True)
            print()
        return 0
    results = []
    for case in cases:
        rounds, block_steps = CASES[case][2]
        rounds = args.rounds or (3 if args.quick else rounds)
        block_steps = args.block or (4 if args.quick else block_steps)
        result = run_case(
            case,
            device,
            args.precision,
            rounds,
            block_steps,
            flush_every,
            warmup,
            args.epoch_steps,
            keys,
        )
        results.append(result)
        print(table(result), flush=True)
        print()
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# load average {load_end:.2f} at end")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"machine": machine, "load": [load, load_end], "results": results}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
