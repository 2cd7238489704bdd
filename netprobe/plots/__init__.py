"""`netprobe plot`: find runs, group them by everything but the seed, draw every figure family."""

from __future__ import annotations

import html
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from netprobe.doctor import findings_html
from netprobe.errors import ConfigError
from netprobe.plots import (  # noqa: F401 - importing registers their figures
    activations,
    augmentation,
    channels,
    compare,
    correlation,
    curves,
    gradient_flow,
    gradients,
    optim_dynamics,
    rwc,
    weights,
)
from netprobe.plots.common import FIGURES, RunGroup
from netprobe.plots.compare import COMPARISONS, swept
from netprobe.store import Run, find_runs

FORMATS = ("png", "svg", "pdf")
# Keys that differ between runs without making them different experiments.
IGNORED_KEYS = {"seed", "name", "out_root", "trainer.resume"}


def flat(config: dict[str, Any] | None, prefix: str = "") -> dict[str, Any]:
    """A nested config as {dotted.key: value}."""
    out: dict[str, Any] = {}
    for key, value in (config or {}).items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat(value, f"{path}."))
        else:
            out[path] = repr(value) if isinstance(value, list) else value
    return out


def group_runs(runs: list[Run]) -> list[RunGroup]:
    """Runs whose configs agree on everything but the seed form one group."""
    configs = [{k: v for k, v in flat(r.config).items() if k not in IGNORED_KEYS} for r in runs]
    keys: dict[tuple, list[int]] = {}
    for i, cfg in enumerate(configs):
        keys.setdefault(tuple(sorted((k, str(v)) for k, v in cfg.items())), []).append(i)
    if len(keys) == 1:
        return [RunGroup([runs[i] for i in next(iter(keys.values()))])]
    all_keys = set().union(*configs)
    varying = sorted(k for k in all_keys if len({str(c.get(k)) for c in configs}) > 1)
    # A group option that differs (model=cnn vs mlp) names the group; the keys it brings along
    # (model.width, data.image_size...) differ because of it and would only lengthen the label.
    chosen = {k.removesuffix(".name") for k in varying if k.endswith(".name")}
    named = [k for k in varying if k.endswith(".name") or k.split(".")[0] not in chosen]
    groups = []
    for members in keys.values():
        values = {k: configs[members[0]].get(k) for k in varying}
        parts = {k.removesuffix(".name"): f"{k.removesuffix('.name')}={values[k]}" for k in named}
        detail = ", ".join(p for k, p in parts.items() if k not in ("model", "data", "init"))
        group = RunGroup([runs[i] for i in members], ",".join(parts.values()), values, detail)
        groups.append(group)
    return sorted(groups, key=lambda g: g.label)


def plot(
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike | None = None,
    formats: Sequence[str] = ("png",),
    only: Sequence[str] | None = None,
) -> list[Path]:
    """Draw every figure the runs under `paths` support into `out`, with an index.html."""
    for fmt in formats:
        if fmt not in FORMATS:
            raise ConfigError(f"unknown format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    for name in only or ():
        if name not in FIGURES and name not in COMPARISONS:
            valid = ", ".join([*FIGURES, *COMPARISONS])
            raise ConfigError(f"unknown figure {name!r}; valid figures: {valid}")
    run_dirs = [d for p in paths for d in _existing(p)]
    runs = []
    for d in run_dirs:
        try:
            runs.append(Run(d))
        except (OSError, ValueError) as exc:
            warnings.warn(f"skipping run {d}: damaged run.json ({exc})", stacklevel=2)
    if not runs:
        raise ConfigError(f"no runs (directories with run.json) under {', '.join(map(str, paths))}")
    if out is None:
        out = Path(os.path.commonpath([Path(p).resolve() for p in paths])) / "figures"
    out = Path(out)
    specs = [FIGURES[n] for n in (only or FIGURES) if n in FIGURES]
    groups = group_runs(runs)
    sections: list[tuple[str, list[Run], list[tuple[str, Path]]]] = []
    written: list[Path] = []
    for group in groups:
        folder = out / _safe(group.label) if group.label else out
        entries = []
        for spec in specs:
            what = f"figure {spec.name} for {group.label or 'runs'}"
            entries += _render(what, spec, group, folder, formats, written)
        sections.append((group.title, group.runs, entries))
    # A sweep over more than the seed: its values side by side, in compare/.
    sweep = swept(groups)
    if sweep is not None:
        entries = []
        for spec in [COMPARISONS[n] for n in (only or COMPARISONS) if n in COMPARISONS]:
            what = f"comparison {spec.name}"
            entries += _render(what, spec, sweep, out / "compare", formats, written)
        if entries:
            sections.insert(0, (f"Comparison: {sweep.title}", runs, entries))
    index = out / "index.html"
    out.mkdir(parents=True, exist_ok=True)
    index.write_text(_index_html(sections, out))
    for path in written:
        print(path)
    print(index)
    print(
        f"{len(written)} figure files for {len(runs)} run(s) in {len(groups)} group(s)",
        file=sys.stderr,
    )
    return written


def _render(
    what: str,
    spec: Any,
    target: Any,
    folder: Path,
    formats: Sequence[str],
    written: list[Path],
) -> list[tuple[str, Path]]:
    """Draw one registered figure of `target` (a group or a sweep), save it in every format;
    returns its (caption, path) index entries."""
    try:
        rendered = spec.draw(target)
    except Exception as exc:  # noqa: BLE001 - one broken figure must not stop the rest
        warnings.warn(f"{what} failed: {exc}", stacklevel=3)
        plt.close("all")  # whatever it had opened
        return []
    if rendered is None:
        plt.close("all")
        return []
    entries = []
    items = rendered.items() if isinstance(rendered, dict) else [("", rendered)]
    for suffix, fig in items:
        stem = f"{spec.name}_{suffix}" if suffix else spec.name
        folder.mkdir(parents=True, exist_ok=True)
        for fmt in formats:
            path = folder / f"{stem}.{fmt}"
            fig.savefig(path, dpi=110)
            written.append(path)
        plt.close(fig)
        caption = spec.caption + (f" ({suffix})" if suffix else "")
        entries.append((caption, folder / f"{stem}.{formats[0]}"))
    return entries


def _existing(path: str | os.PathLike) -> list[Path]:
    if not Path(path).exists():
        raise ConfigError(f"no such file or directory: {path}")
    return list(find_runs(path))


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "=-_.," else "_" for c in label)


def _index_html(sections: list[tuple[str, list[Run], list[tuple[str, Path]]]], out: Path) -> str:
    parts = [
        "<!doctype html><meta charset='utf-8'><title>netprobe figures</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}"
        "figure{display:inline-block;margin:1em;vertical-align:top;max-width:640px}"
        "img{max-width:100%;border:1px solid #ddd}figcaption{font-size:0.9em;color:#333}</style>",
        "<h1>netprobe figures</h1>",
    ]
    # The findings first, each linked to the figure of its run's group that shows the evidence.
    links = [
        (run, {p.stem: p.relative_to(out).as_posix() for _, p in entries})
        for _, members, entries in sections
        for run in members
    ]
    parts.append(findings_html(links))
    for title, members, entries in sections:
        runs = ", ".join(html.escape(str(r.path)) for r in members[:5])
        more = f" and {len(members) - 5} more" if len(members) > 5 else ""
        parts.append(f"<h2>{html.escape(title)}</h2><p>{len(members)} run(s): {runs}{more}</p>")
        for caption, path in entries:
            rel = html.escape(path.relative_to(out).as_posix())
            parts.append(
                f"<figure><a href='{rel}'><img src='{rel}' alt='{html.escape(caption)}'></a>"
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
    return "\n".join(parts) + "\n"


__all__ = ["FIGURES", "group_runs", "plot"]
