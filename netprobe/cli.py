"""The `netprobe` command: dispatch to train, plot, ls, export and query (SPEC §1)."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

from netprobe.errors import ConfigError

USAGE = """\
usage: netprobe {train,probes,plot,ls,doctor,export,query} ...

  netprobe train [OVERRIDES]     train with probes attached (Hydra app; `netprobe train --help`)
  netprobe train -m seed=0,1,2   sweep with Hydra multirun
  netprobe probes [OVERRIDES]    when each probe the config enables runs, and what it records
  netprobe plot PATH... [--out DIR] [--format png,svg,pdf] [--only NAMES] [--jobs N]
                                 render every figure the runs under PATH support
  netprobe ls PATH... [--sort KEY] [--filter KEY=VALUE] [--columns A,B] [--format table|csv|json]
                                 one row per run: status, steps, epochs, duration, val acc, ...
  netprobe doctor PATH... [--format table,json] [--strict]
                                 findings per run (code, severity, layers, evidence, advice)
  netprobe export PATH --to tensorboard --out DIR
                                 TensorBoard event files for the runs under PATH
  netprobe query PATH "SQL" [--format table,csv,json,parquet] [--out FILE]
                                 SQL over the runs under PATH: views runs, findings,
                                 scalars, histograms, matrices, layers (each with `run`)

exit codes: 0 success, 1 run failed or diverged (or doctor --strict found a problem),
            2 bad usage or input, 130 interrupted
"""


def fail(message: str) -> int:
    print(f"netprobe: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _run(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:
        # Output piped into `head` and the like: stop quietly, as other command-line tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _run(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        from netprobe import __version__

        print(f"netprobe {__version__}")
        return 0
    command, rest = args[0], args[1:]
    commands = {
        "train": train_command,
        "probes": probes_command,
        "plot": plot_command,
        "ls": ls_command,
        "doctor": doctor_command,
        "export": export_command,
        "query": query_command,
    }
    if command not in commands:
        return fail(f"unknown command {command!r}; valid commands: {', '.join(commands)}")
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return commands[command](rest)
    except ConfigError as exc:
        return fail(str(exc))
    except KeyboardInterrupt:
        print("netprobe: interrupted", file=sys.stderr)
        return 130


def _show_warning(
    message: Warning | str, category: type[Warning], *args: object, **kw: object
) -> None:
    """Warnings (a skipped damaged file, say) as one line each, without source excerpts."""
    print(f"netprobe: warning: {message}", file=sys.stderr)


def train_command(args: list[str]) -> int:
    from netprobe.app import CONFIG_FLAGS, INFO_FLAGS, hydra_main
    from netprobe.config import preflight

    if CONFIG_FLAGS & set(args):
        preflight(args, check_data=False)  # the config is checked; nothing is built or trained
    elif not INFO_FLAGS & set(args):
        from netprobe.distributed import launched
        from netprobe.resume import check_command_line

        check_command_line(args)
        # Under torchrun only rank 0 checks (or downloads) the data; the others wait for it
        # when they join the process group.
        preflight(args, check_data=launched().is_main)
    return hydra_main(args)


def probes_command(args: list[str]) -> int:
    """One line per enabled probe of the config that `netprobe train OVERRIDES` would compose:
    its name, when it runs, and what it records (the probes are built on the model, not run)."""
    if {"-h", "--help"} & set(args):
        print("usage: netprobe probes [OVERRIDES]\n\nWhen each probe the config enables runs, and "
              "what it records (the overrides of `netprobe train`, e.g. probes=all).")  # fmt: skip
        return 0
    # An override never starts with "-": this is a flag of `netprobe train` (-m, --cfg).
    flag = next((a for a in args if a.startswith("-")), None)
    if flag is not None:
        raise ConfigError(
            f"netprobe probes takes overrides (key=value), not {flag!r}: it lists the probes "
            "of one config, so give one value per key (no -m sweep)"
        )

    from netprobe.checks import blank_probes
    from netprobe.config import compose
    from netprobe.probes import close_probes
    from netprobe.probes.memory import split_budget
    from netprobe.probes.schedule import listing

    cfg = compose(args)
    probes, _ = split_budget(cfg.probes)
    built = blank_probes(cfg, probes)
    close_probes(built)  # only their schedules and descriptions are read
    print("\n".join(listing(built)) or "no probes enabled (probes=none)")
    return 0


def plot_command(args: list[str]) -> int:
    parser = _Parser(
        prog="netprobe plot",
        description="Render every figure the stored runs under PATH support, and an index.html.",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="run or sweep directories")
    parser.add_argument("--out", help="output folder (default: PATH/figures for one PATH)")
    parser.add_argument(
        "--format", type=_split, default="png", help="comma-separated: png, svg, pdf"
    )
    parser.add_argument(
        "--only", type=_names, help="comma-separated figure names (see the list below)"
    )
    parser.add_argument(
        "--jobs", type=_positive, default=None, help="worker processes (default: the cores)"
    )
    from netprobe.plots import COMPARISONS, FIGURES, plot

    parser.epilog = "figures: " + ", ".join([*FIGURES, *COMPARISONS])
    ns = _parse(parser, args)
    if isinstance(ns, int):
        return ns
    plot(ns.paths, out=ns.out, formats=ns.format, only=ns.only, jobs=ns.jobs)
    return 0


def ls_command(args: list[str]) -> int:
    from netprobe.listing import COLUMNS, FORMATS

    parser = _Parser(
        prog="netprobe ls",
        description="One row per run; the jobs of a sweep together, with mean ± std over seeds.",
        epilog=f"columns: {', '.join(COLUMNS)}; --sort, --filter and --columns also take "
        "config keys (optim.lr) and run.json keys",
    )
    parser.add_argument("paths", nargs="*", default=["outputs"], metavar="PATH")
    parser.add_argument("--sort", metavar="KEY", help="order by KEY; --sort=-KEY: descending")
    parser.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keep runs whose KEY is VALUE (or one of VALUE,VALUE); repeat to narrow",
    )
    parser.add_argument("--columns", type=_names, help="comma-separated columns to show")
    parser.add_argument("--format", default="table", help=f"one of {', '.join(FORMATS)}")
    ns = _parse(parser, args)
    if isinstance(ns, int):
        return ns
    from netprobe.listing import list_runs

    list_runs(ns.paths, sort=ns.sort, filters=ns.filter, columns=ns.columns, fmt=ns.format)
    return 0


def doctor_command(args: list[str]) -> int:
    from dataclasses import fields

    from netprobe.doctor import Thresholds, report

    parser = _Parser(
        prog="netprobe doctor",
        description="Findings per run from the stored tables: what looks wrong, where, the "
        "evidence and what usually helps. Thresholds default to each run's own doctor config.",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="run, sweep or folder")
    parser.add_argument("--format", default="table", choices=("table", "json"))
    parser.add_argument("--strict", action="store_true", help="exit 1 on any warning or error")
    for f in fields(Thresholds):
        kind = int if f.type in (int, "int") else float
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, metavar="X")
    ns = _parse(parser, args)
    if isinstance(ns, int):
        return ns
    overrides = {f.name: getattr(ns, f.name) for f in fields(Thresholds)}
    found = report(ns.paths, {k: v for k, v in overrides.items() if v is not None}, ns.format)
    return 1 if ns.strict and found else 0


EXPORT_TARGETS = ("tensorboard",)


def export_command(args: list[str]) -> int:
    parser = _Parser(
        prog="netprobe export",
        description="Write the stored runs under PATH in another tool's format.",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="run or sweep directories")
    parser.add_argument("--to", required=True, help="format: " + ", ".join(EXPORT_TARGETS))
    parser.add_argument("--out", required=True, help="output folder (tensorboard --logdir DIR)")
    ns = _parse(parser, args)
    if isinstance(ns, int):
        return ns
    if ns.to not in EXPORT_TARGETS:
        return fail(f"--to {ns.to!r} is not valid; valid: {', '.join(EXPORT_TARGETS)}")
    from netprobe.tensorboard import export

    written = export(ns.paths, ns.out)
    print(f"wrote {len(written)} TensorBoard runs to {ns.out}; view: tensorboard --logdir {ns.out}")
    return 0


def query_command(args: list[str]) -> int:
    from netprobe.query import FORMATS

    parser = _Parser(
        prog="netprobe query",
        description="SQL (DuckDB) over every run under PATH. Views: runs (run.json fields and "
        "the flattened config, one row per run), findings (one row per doctor finding kept in "
        "run.json), scalars, histograms, matrices, layers; "
        "each has a `run` column.",
    )
    parser.add_argument("path", metavar="PATH", help="run or sweep directory")
    parser.add_argument("sql", metavar="SQL", help='e.g. "SELECT * FROM runs"')
    parser.add_argument("--format", help=f"{', '.join(FORMATS)} (default: from --out, else table)")
    parser.add_argument("--out", help="write the result to this file instead of printing it")
    ns = _parse(parser, args)
    if isinstance(ns, int):
        return ns
    from netprobe.query import output_format, query, write_result

    fmt = output_format(ns.format, ns.out)
    write_result(query([ns.path], ns.sql), fmt, ns.out)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (via ConfigError), not usage text plus a line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{self.prog}: {message}")


def _parse(parser: argparse.ArgumentParser, args: list[str]) -> argparse.Namespace | int:
    """Parse `args`; `--help` returns 0 instead of exiting."""
    try:
        return parser.parse_args(args)
    except SystemExit as exc:
        return int(exc.code or 0)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _names(text: str) -> list[str] | None:
    """A comma-separated option where an empty value means the default (all of them)."""
    return _split(text) if text else None


if __name__ == "__main__":
    raise SystemExit(main())
