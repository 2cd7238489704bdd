"""What probes cost per training step: four variants timed side by side in one process.

(a) a plain hand-written loop (forward, loss, zero_grad, backward, step);
(b) netprobe's own training step (`netprobe.train.train_step`) with probes=none;
(c) the per-step probes: gradients and optim_dynamics, every step;
(d) probes=all at default schedules (whatever conf/probes/all.yaml lists).

Each variant has its own model (same initial weights) and optimizer and sees the same batches,
held on the device. After a warm-up the variants take turns, a block of `--block` steps each in a
rotating order, so that the drifting load of a shared machine hits all variants alike. The step
ratio is the median over rounds of a variant's block time / (a)'s block time in the same round.
Flushes (every `--flush-every` steps, trainer.flush_every's default) and epoch-end captures
(`at: epoch`, then one flush) are timed apart and amortized: flush / flush_every and
captures / `--epoch-steps`, added to the step ratio in the last column, the overhead a run sees.

    python scripts/bench_overhead.py                 # cnn and mlp on CPU; resnet18 too with a GPU
    python scripts/bench_overhead.py --device cuda --cases resnet18 --precision bf16
    python scripts/bench_overhead.py --quick         # smoke test: a few seconds
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
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
from omegaconf import OmegaConf

import netprobe
from netprobe.config import compose
from netprobe.data import build_data
from netprobe.init import initialize
from netprobe.models import build_model
from netprobe.train import build_optimizer, resolve_device, train_step

# Case: config overrides, and the epoch length (steps) its epoch captures are amortized over.
CASES: dict[str, tuple[list[str], int]] = {
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
    ),
    "mlp": (["model=mlp", "data=digits"], 23),  # digits: 1,437 training images at batch 64
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
    ),
}
VARIANTS = {
    "a": "plain loop",
    "b": "probes=none",
    "c": "gradients+optim_dynamics",
    "d": "probes=all",
}


@dataclass
class Variant:
    key: str
    step: Callable[[torch.Tensor, torch.Tensor], None]
    monitor: netprobe.Monitor | None = None
    blocks: list[float] = field(default_factory=list)  # seconds per step, one per round
    flushes: list[float] = field(default_factory=list)  # seconds per flush
    epoch_capture: list[float] = field(default_factory=list)  # seconds per end_epoch


def probe_specs() -> dict[str, dict[str, Any]]:
    """Each variant's probes, composed from the config groups as `netprobe train` would."""
    specs = {}
    for key, override in (("b", "probes=none"), ("c", "probes=[gradients,optim_dynamics]")):
        specs[key] = OmegaConf.to_container(compose([override]).probes, resolve=True) or {}
    specs["c"] = {name: {**cfg, "every": 1} for name, cfg in specs["c"].items()}
    specs["d"] = OmegaConf.to_container(compose(["probes=all"]).probes, resolve=True) or {}
    return specs


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_variants(
    case: str, device: torch.device, precision: str, out: Path, flush_every: int
) -> tuple[list[Variant], list[tuple[torch.Tensor, torch.Tensor]], Any]:
    overrides, _ = CASES[case]
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
    for key in VARIANTS:
        model = copy.deepcopy(base)
        model.train()
        optimizer, _ = build_optimizer(model, cfg.optim, epochs=1)
        if key == "a":

            def plain(x, y, model=model, optimizer=optimizer):
                with autocast():
                    loss = F.cross_entropy(model(x).float(), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

            variants.append(Variant(key, plain))
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


def timed_flushes(v: Variant, device: torch.device) -> None:
    """Time the variant's flushes (drain to the host, Parquet write) apart from its steps."""
    mon = v.monitor
    flush = mon.flush

    def timed() -> None:
        synchronize(device)  # the queued training work is not the flush's cost
        t0 = time.perf_counter()
        flush()
        v.flushes.append(time.perf_counter() - t0)

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
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="netprobe-bench-") as tmp:
        variants, batches, cfg = build_variants(case, device, precision, Path(tmp), flush_every)
        for v in variants:
            if v.monitor is not None:
                timed_flushes(v, device)

        def block(v: Variant, start: int) -> float:
            flushed = sum(v.flushes)
            synchronize(device)
            t0 = time.perf_counter()
            for i in range(start, start + block_steps):
                x, y = batches[i % len(batches)]
                v.step(x, y)
            synchronize(device)
            # Flushes are counted apart, amortized over flush_every steps.
            return (time.perf_counter() - t0 - (sum(v.flushes) - flushed)) / block_steps

        # Every variant sees the same batches in the same order.
        for r in range(warmup_rounds):
            for v in variants:
                block(v, r * block_steps)
        for v in variants:
            v.flushes.clear()
        for r in range(rounds):
            # A rotating order: no variant always runs right after the same other one.
            for v in variants[r % 4 :] + variants[: r % 4]:
                v.blocks.append(block(v, (warmup_rounds + r) * block_steps))
        for v in variants:
            if v.monitor is None:
                continue
            for i in range(3):
                # A step first: a probe captures at most once per step.
                v.step(*batches[i % len(batches)])
                synchronize(device)
                t0 = time.perf_counter()
                v.monitor.end_epoch()  # epoch captures, then a flush (timed apart)
                synchronize(device)
                v.epoch_capture.append(time.perf_counter() - t0 - v.flushes.pop())
            v.monitor.close()
        plain = variants[0].blocks
        plain_s = statistics.median(plain)
        epoch_steps = epoch_steps or CASES[case][1]
        rows = []
        for v in variants:
            step_ratio = statistics.median(t / a for t, a in zip(v.blocks, plain))
            flush = statistics.median(v.flushes) if v.flushes else 0.0
            capture = statistics.median(v.epoch_capture) if v.epoch_capture else 0.0
            rows.append(
                {
                    "variant": v.key,
                    "what": VARIANTS[v.key],
                    "ms_per_step": 1e3 * statistics.median(v.blocks),
                    "ms_per_step_min": 1e3 * min(v.blocks),
                    "step_ratio": step_ratio,
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
        "variants": rows,
    }


def table(result: dict[str, Any]) -> str:
    head = (
        f"{result['case']} on {result['device']}, precision {result['precision']}, batch "
        f"{result['batch_size']}, {result['optim']}: {result['rounds']} rounds of "
        f"{result['block_steps']} steps per variant; a flush every {result['flush_every']} steps, "
        f"an epoch = {result['epoch_steps']} steps"
    )
    lines = [
        head,
        "",
        "| variant | ms/step | step ratio | flush, ms | epoch captures, ms | **ratio to (a)** |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["variants"]:
        lines.append(
            f"| ({r['variant']}) {r['what']} | {r['ms_per_step']:.2f} | {r['step_ratio']:.3f} "
            f"| {r['flush_ms']:.1f} | {r['epoch_capture_ms']:.1f} | **{r['ratio']:.3f}** |"
        )
    probes = result["variants"][-1]["probes"]
    lines.append("")
    lines.append(f"(d) ran: {', '.join(probes) or 'none'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda")
    parser.add_argument("--cases", default=None, help="comma-separated: cnn, mlp, resnet18")
    parser.add_argument("--precision", default="32", choices=["32", "bf16", "16"])
    parser.add_argument("--rounds", type=int, default=None, help="timed blocks per variant")
    parser.add_argument("--block", type=int, default=None, help="steps per timed block")
    parser.add_argument("--flush-every", type=int, default=200, help="trainer.flush_every")
    parser.add_argument("--epoch-steps", type=int, default=None, help="steps per epoch")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="a smoke test: tiny blocks")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = args.cases.split(",") if args.cases else ["cnn", "mlp"]
    if not args.cases and device.type == "cuda":
        cases = ["resnet18", "cnn", "mlp"]
    for case in cases:
        if case not in CASES:
            parser.error(f"unknown case {case!r}; valid cases: {', '.join(CASES)}")
    rounds = args.rounds or (3 if args.quick else 40)
    block_steps = args.block or (4 if args.quick else 10)
    flush_every = 5 if args.quick else args.flush_every
    warmup = 1 if args.quick else 3
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    machine = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads"
    )
    print(f"# {machine}; torch {torch.__version__}; load average {load:.2f} at start")
    results = []
    for case in cases:
        result = run_case(
            case, device, args.precision, rounds, block_steps, flush_every, warmup, args.epoch_steps
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
