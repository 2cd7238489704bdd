"""Train the gallery of planted pathologies (tests/gallery.py) and render their reports: the
doctor's table for all of them in OUT/report.txt (and report.json), and each run's figures with
the findings on top of its index.html.

    python scripts/doctor_gallery.py /tmp/gallery
    python scripts/doctor_gallery.py /tmp/gallery --only dead_units stalled_layer --no-plots
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from netprobe.config import compose  # noqa: E402
from netprobe.doctor import report  # noqa: E402
from netprobe.train import train  # noqa: E402
from tests.gallery import BASE, CASES  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--only", nargs="*", help="codes to train")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny models: more threads only wait on each other
    runs = []
    for case in CASES:
        if args.only and case.code not in args.only:
            continue
        run_dir = args.out / case.code
        shutil.rmtree(run_dir, ignore_errors=True)
        status = train(compose([*BASE, *case.overrides]), run_dir)
        print(f"{case.code:<20} {status:<10} {case.what}", file=sys.stderr)
        runs.append(run_dir)
        if not args.no_plots:
            from netprobe.plots import plot

            with contextlib.redirect_stdout(io.StringIO()):
                plot([run_dir], out=run_dir / "figures")
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        report(runs, {}, "table")
    (args.out / "report.txt").write_text(text.getvalue())
    print(text.getvalue())
    with contextlib.redirect_stdout(io.StringIO()) as out:
        report(runs, {}, "json")
    (args.out / "report.json").write_text(json.dumps(json.loads(out.getvalue()), indent=2))
    print(f"reports: {args.out / 'report.txt'}, {args.out}/*/figures/index.html", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
