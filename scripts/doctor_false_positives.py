"""How often `netprobe doctor` warns about healthy runs: short runs of every built-in model and
every experiment preset, over several seeds, on the bundled digits or small synthetic images.
Prints each run's findings and the share of runs with any warning or error.

    python scripts/doctor_false_positives.py                  # 3 seeds
    python scripts/doctor_false_positives.py --seeds 0 --keep /tmp/healthy
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from netprobe import load  # noqa: E402
from netprobe.config import compose  # noqa: E402
from netprobe.doctor import _rectified, _Tables, diagnose, problems  # noqa: E402
from netprobe.train import train  # noqa: E402

# Small synthetic images: every model, CIFAR-sized ones included, trains in seconds on a CPU.
SYNTHETIC = [
    "data=synthetic",
    "data.image_size=16",
    "data.num_samples=1024",
    "data.probe_size=64",
    "trainer.device=cpu",
]
# Every probe a doctor rule reads; the others (correlation, channels, ...) only cost time here.
PROBES = "probes=[gradients,weights,rwc,optim_dynamics,activations]"
MODELS = ["mlp", "cnn", "alexnet", "vgg19", "resnet18", "xception"]
# AlexNet has no normalization layers: at Adam's default lr 1e-3 it kills most of its ReLUs and
# stays at 25 % accuracy (the doctor says so); at 1e-4 it has not left chance after 3 short
# epochs; 3e-4 trains it.
OWN = {"alexnet": ["optim.lr=3e-4"]}
PRESETS = [
    "rwc",
    "init_test",
    "feature_signal",
    "optimization_insight",
    "grad_analysis",
    "gradient_flow",
]


def configs(epochs: int) -> dict[str, list[str]]:
    """name → overrides of every healthy configuration."""
    out = {}
    for model in MODELS:
        out[f"model={model}"] = [
            *SYNTHETIC,
            f"model={model}",
            PROBES,
            f"trainer.epochs={epochs}",
            *OWN.get(model, []),
        ]
    out["digits mlp"] = [PROBES, f"trainer.epochs={epochs}", "trainer.device=cpu"]
    for preset in PRESETS:
        # The presets' own models, optimizers and probes; short, on synthetic data.
        out[f"experiment={preset}"] = [
            f"experiment={preset}",
            *SYNTHETIC,
            f"trainer.epochs={epochs}",
            "trainer.target_val_acc=null",
        ]
    return out


def margins(run_dir: Path) -> dict[str, float]:
    """How close a run came to each threshold: the measured quantity each rule compares."""
    t = _Tables(load(run_dir))
    out: dict[str, float] = {}
    total = t.curve("grad_l2_total")["value"].to_numpy()
    total = total[np.isfinite(total)]
    if len(total) >= 20:
        w = max(1, round(len(total) * 0.1))
        out["grad_growth"] = float(total[w:].max() / np.median(total[:w]))
    if t.has("gradients", "l2"):
        wide = t.per_layer("gradients", "l2")
        sizes = np.array([max(t.numel(n), 1) for n in wide.columns], float)
        rms = np.nanmedian(wide.to_numpy() / np.sqrt(sizes), axis=0)
        out["grad_ratio_min"] = float(rms.min() / np.median(rms))
        out["grad_ratio_max"] = float(rms.max() / np.median(rms))
    if t.has("activations", "train/dead_frac"):
        wide = t.per_layer("activations", "train/dead_frac")
        rectified = _rectified(t)
        wide = wide[[c for c in wide.columns if c in rectified]]
        if not wide.empty:
            out["dead_frac_max"] = float(wide.iloc[-1].max())
    if t.has("optim_dynamics", "zero_frac_1e7"):
        wide = t.per_layer("optim_dynamics", "zero_frac_1e7")
        out["zero_frac_max"] = float(wide.iloc[len(wide) // 2 :].median().max())
    if t.has("rwc", "rwc"):
        change = t.per_layer("rwc", "rwc").median()
        out["stall_ratio_min"] = float(change.min() / change.median())
    loss = t.curve("loss")["value"].to_numpy()
    if len(loss) > 40:
        values = pd.Series(loss)
        ref = values.rolling(20).median().shift(1)
        spike = (values >= 3 * ref) & (values - ref >= 0.1 * np.median(loss[:20]))
        out["spike_share"] = float(spike[20:].mean())
    return {k: round(v, 4) for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="names of configurations to run")
    parser.add_argument("--keep", help="keep the runs in this folder")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="netprobe-healthy-"))
    results = []
    for name, overrides in configs(args.epochs).items():
        if args.only and name not in args.only:
            continue
        for seed in args.seeds:
            run_dir = root / name.replace(" ", "_").replace("=", "-") / f"seed{seed}"
            t0 = time.perf_counter()
            status = train(compose([*overrides, f"seed={seed}"]), run_dir)
            found = problems(diagnose(run_dir))
            took = time.perf_counter() - t0
            codes = [f"{f.severity}:{f.code}" for f in found]
            print(f"{name:<32} seed {seed}  {status:<9} {took:5.1f} s  {codes or 'ok'}", flush=True)
            for f in found:
                print(f"    {f.code}: {f.message} {f.layers} {f.evidence}")
            near = margins(run_dir)
            print(f"    {near}")
            results.append(
                {"config": name, "seed": seed, "status": status, "findings": codes, **near}
            )
    flagged = sum(1 for r in results if r["findings"])
    print(f"{flagged} of {len(results)} healthy runs with a warning or error")
    table = pd.DataFrame(results)
    for column in table.columns[5:]:
        print(
            f"closest to a threshold: {column} min {table[column].min()} max {table[column].max()}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
