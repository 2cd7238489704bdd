"""The doctor's findings told: the closing summary of a run, the report page's table, and
`netprobe doctor` (a table per sweep, or JSON)."""

from __future__ import annotations

import html
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from netprobe.doctor.common import Finding, missing_advice, thresholds
from netprobe.doctor.rules import counts, diagnose, problems
from netprobe.store import Run, json_text, load, update_info


def close_run(run_dir: str | os.PathLike) -> str:
    """After training: keep the run's warnings and errors in run.json `findings` and return
    the lines for the closing summary (empty when there are none)."""
    try:
        found = problems(diagnose(run_dir))
        update_info(run_dir, findings=[f.to_dict() for f in found])
    except Exception as exc:  # noqa: BLE001 - a diagnosis must never cost the run its summary
        return f"doctor: not run ({type(exc).__name__}: {exc})\n"
    if not found:
        return ""
    lines = [f"doctor: {counts(found)} (netprobe doctor {run_dir} for the evidence)"]
    lines += [f"  {f.severity:<7} {f.code:<19} {f.message}{_where(f)}" for f in found]
    return "\n".join(lines) + "\n"


def _where(f: Finding) -> str:
    layers = ", ".join(f.layers[:3]) + (f" +{len(f.layers) - 3}" if len(f.layers) > 3 else "")
    return f" [{layers}]" if layers else ""


def findings_html(items: Iterable[tuple[Run, Mapping[str, str]]]) -> str:
    """The report page's opening section: each run's warnings and errors, each linked to the
    figure showing its evidence (`links`: figure file stem → href)."""
    merged: dict[Path, tuple[Run, dict[str, str]]] = {}
    for run, links in items:  # a run in several sections: every figure it appears in
        merged.setdefault(run.path, (run, {}))[1].update(links)
    rows = []
    for run, links in merged.values():
        for f in problems(diagnose(run)):
            href = _figure_href(f.figure, links)
            code = html.escape(f.code)
            code = f"<a href='{html.escape(href)}'>{code}</a>" if href else code
            evidence = html.escape(", ".join(f"{k}={v}" for k, v in f.evidence.items()))
            rows.append(
                f"<tr class='{f.severity}'><td>{html.escape(str(run.path))}</td>"
                f"<td>{f.severity}</td>"
                f"<td>{code}</td><td>{html.escape(f.message)}{html.escape(_where(f))}"
                f"<br><small>{evidence}</small></td><td>{html.escape(f.advice)}</td></tr>"
            )
    if not rows:
        return "<p id='findings'>netprobe doctor: no warnings or errors.</p>"
    return (
        "<style>#findings .error td:nth-child(2){color:#b3261e}"
        "#findings .warning td:nth-child(2){color:#a05a00}</style><table id='findings'>"
        "<tr><th>run</th><th>severity</th><th>code</th><th>what</th><th>what helps</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def _figure_href(figure: str | None, links: Mapping[str, str]) -> str | None:
    if figure is None:
        return None
    for stem, href in links.items():
        if stem == figure or stem.startswith(f"{figure}_"):
            return href
    return None


def report(
    paths: Iterable[str | os.PathLike], overrides: Mapping[str, Any], fmt: str = "table"
) -> int:
    """`netprobe doctor`: diagnose every run under `paths`, print a table per sweep (or JSON);
    returns the number of warnings and errors."""
    from netprobe.listing import runs_by_sweep  # listing shows health(): import late

    thresholds(overrides)  # refuse a bad flag before reading anything
    order = [
        (sweep, run_dir, members[run_dir])
        for sweep, members in runs_by_sweep(paths).items()
        for run_dir in sorted(members, key=lambda d: (members[d], str(d)))
    ]
    dirs = [d for _, d, _ in order]
    workers = min(os.cpu_count() or 1, len(dirs) // 50)  # a pool pays off from ~100 runs on
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            done = list(pool.map(_examine, dirs, [overrides] * len(dirs), chunksize=25))
    else:
        done = [_examine(d, overrides) for d in dirs]
    results = [(s, d, w, status, found) for (s, d, w), (status, found) in zip(order, done)]
    if fmt == "json":
        out = [
            {
                "run": str(d),
                "sweep": str(s) if s else None,
                "swept": w,
                "status": st,
                "health": counts(problems(f)),
                "findings": [x.to_dict() for x in f],
            }
            for s, d, w, st, f in results
        ]
        print(json_text(out))
    else:
        _print_tables(results)
    return sum(len(problems(f)) for *_, f in results)


def _examine(run_dir: Path, overrides: Mapping[str, Any]) -> tuple[str, list[Finding]]:
    """One run's status and findings; a run whose run.json cannot be read is one error."""
    try:
        run = load(run_dir)
        return run.status, diagnose(run, overrides=overrides)
    except (OSError, ValueError) as exc:
        return "damaged", [Finding("damaged", "error", f"run.json cannot be read: {exc}")]


_STYLE = {"error": "bold red", "warning": "yellow", "info": "dim"}


def _print_tables(results: list[tuple[Path | None, Path, str, str, list[Finding]]]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)
    groups: dict[Path | None, list] = {}
    for item in results:
        groups.setdefault(item[0], []).append(item)
    for sweep, items in groups.items():
        title = f"sweep {sweep} ({len(items)} runs)" if sweep else "runs"
        table = Table(title=title, title_justify="left", show_lines=True)
        if sweep:
            table.add_column("swept", overflow="fold")
        for col in ("run", "severity", "code", "where", "evidence", "what helps"):
            table.add_column(col, overflow="fold", no_wrap=col in ("severity", "code"))
        for _, run_dir, swept, status, found in items:
            shown = str(run_dir.resolve().relative_to(sweep)) if sweep else str(run_dir)
            lead = [swept] if sweep else []
            rows = [
                (f.severity, f.code, _place(f), _evidence(f), f.advice, f.message)
                for f in problems(found)
            ]
            unchecked = [f for f in found if f.severity == "info"]
            if not rows:
                rows.append(("ok", "", "", "", "", f"status {status}"))
            if unchecked:
                missing = {f.evidence.get("missing", ""): f.evidence.get("probe_on", False)
                           for f in unchecked}  # fmt: skip
                missing.pop("", None)
                off = sorted(p for p, on in missing.items() if not on)
                advice = missing_advice(off, sorted(p for p, on in missing.items() if on))
                codes = ", ".join(f.code for f in unchecked)
                rows.append(("info", "not checked", codes, "", advice, ""))
            for i, (severity, code, where, evidence, advice, message) in enumerate(rows):
                style = _STYLE.get(severity, "green")
                text = f"{message}\n{evidence}".strip() if message else evidence
                table.add_row(
                    *([escape(x) for x in lead] if i == 0 else [""] * len(lead)),
                    escape(shown) if i == 0 else "",
                    f"[{style}]{severity}[/]",
                    escape(code),
                    escape(where),
                    escape(text),
                    escape(advice),
                )
        console.print(table)


def _place(f: Finding) -> str:
    parts = [", ".join(f.layers)] if f.layers else []
    if f.steps:
        parts.append(
            f"steps {f.steps[0]}–{f.steps[1]}" if f.steps[0] != f.steps[1] else f"step {f.steps[0]}"
        )
    if f.epochs:
        parts.append(
            f"epochs {f.epochs[0]}–{f.epochs[1]}"
            if f.epochs[0] != f.epochs[1]
            else f"epoch {f.epochs[0]}"
        )
    return "\n".join(parts)


def _evidence(f: Finding) -> str:
    return "; ".join(f"{k}={v}" for k, v in f.evidence.items())
