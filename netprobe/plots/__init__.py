"""`netprobe plot`: find runs, group them by everything but the seed, draw every figure family in
parallel worker processes, skip figures whose stored inputs did not change, write index.html."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
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
from netprobe.plots.common import FIGURES, RunGroup, fit_titles
from netprobe.plots.compare import COMPARISONS, swept
from netprobe.plots.groups import group_runs, mapping, path_from
from netprobe.plots.page import Entry, Extra, Section, page
from netprobe.store import Run, make_out_folder, read_runs_under, run_holding, write_json

FORMATS = ("png", "svg", "pdf")
MANIFEST = ".netprobe-plot.json"  # what each figure was drawn from, to skip unchanged ones
GROUPS_FILE = "groups.json"  # group → folder, differing keys, runs
# Figures that take several times longer than the rest go to the workers first.
SLOW = {
    "activation_distributions": 6,
    "activation_evolution": 6,
    "weights_histograms": 4,
    "weights_evolution": 4,
    "gradient_flow_graph": 4,
    "corr_grid": 3,
    "augmentation_correlations": 2,
    "grad_sign_map": 2,
}


@dataclass(frozen=True)
class Job:
    """One registered figure of one target (a group, or the sweep comparison)."""

    target: int
    name: str
    folder: str  # relative to the output folder; "" for its top

    @property
    def key(self) -> str:
        return f"{self.folder}/{self.name}"


# The groups and sweep being drawn: set before the workers fork, so they inherit the loaded tables.
_TARGETS: list[Any] = []
_OUT = Path()
_FORMATS: tuple[str, ...] = ()


def plot(
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike | None = None,
    formats: Sequence[str] = ("png",),
    only: Sequence[str] | None = None,
    jobs: int | None = None,
    extra: Sequence[Extra] = (),
) -> list[Path]:
    """Draw every figure the runs under `paths` support into `out`, with an index.html and the
    group mapping; returns every figure file the page shows (drawn now or unchanged since)."""
    formats = tuple(formats)
    _check(formats, only, jobs)
    out = _out_folder(paths, out)
    runs = read_runs_under(paths)
    groups = group_runs(runs)
    make_out_folder(out)
    targets, folders = _targets(groups)
    job_list = [
        Job(t, name, folders[t])
        for t, target in enumerate(targets)
        for name in _names(target, only)
    ]
    manifest = _read_manifest(out)
    # Every figure these runs have, whether drawn now (--only) or not.
    every = {
        Job(t, n, folders[t]).key for t, target in enumerate(targets) for n in _names(target, None)
    }
    _drop_gone(out, manifest, every, {str(Path(r.path).resolve()) for r in runs})
    done, drawn = _update(job_list, targets, formats, out, jobs, manifest)
    write_json(out / MANIFEST, manifest)  # other figures' records stay for a later full plot
    write_json(out / GROUPS_FILE, mapping(groups, out))
    index = _write_index(out, _sections(targets, folders, job_list, done), extra)
    files = [out / f for job in job_list for e in done[job.key] for f in e["files"]]
    for path in files:
        print(path)
    print(index)
    print(
        f"{len(files)} figure files for {len(runs)} run(s) in {len(groups)} group(s): "
        f"{sum(len(entries) for entries in drawn.values())} figures drawn, "
        f"{sum(len(done[j.key]) for j in job_list if j.key not in drawn)} unchanged",
        file=sys.stderr,
    )
    return files


def _check(formats: tuple[str, ...], only: Sequence[str] | None, jobs: int | None) -> None:
    """Refuse a bad option before anything is read."""
    for fmt in formats:
        if fmt not in FORMATS:
            raise ConfigError(f"unknown format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    if not formats:
        raise ConfigError(f"no format given; valid formats: {', '.join(FORMATS)}")
    for name in only or ():
        if name not in FIGURES and name not in COMPARISONS:
            valid = ", ".join([*FIGURES, *COMPARISONS])
            raise ConfigError(f"unknown figure {name!r}; valid figures: {valid}")
    if jobs is not None and jobs < 1:
        raise ConfigError(f"--jobs {jobs} must be a positive number of worker processes")


def _out_folder(paths: Sequence[str | os.PathLike], out: str | os.PathLike | None) -> Path:
    """`out`, by default `figures` in the folder the paths share; refused when it is a file, or
    inside a run directory anywhere but its own `figures/` (its tables, its root)."""
    if out is None:
        out = Path(os.path.commonpath([Path(p).resolve() for p in paths])) / "figures"
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the figures and index.html")
    run = run_holding(out)
    if run is not None and not out.resolve().is_relative_to(run / "figures"):
        raise ConfigError(
            f"--out {out} is inside the run directory {run}, where plot writes only into "
            f"{run / 'figures'}; give that folder or an --out outside every run"
        )
    return out


def _targets(groups: list[RunGroup]) -> tuple[list[Any], list[str]]:
    """What gets figures: each group, then the sweep comparison when the groups form one; and
    the folder of each."""
    targets: list[Any] = list(groups)
    folders = [g.label for g in groups]
    sweep = swept(groups)
    if sweep is not None:
        targets.append(sweep)
        folders.append("compare")
    return targets, folders


def _update(
    job_list: list[Job],
    targets: list[Any],
    formats: tuple[str, ...],
    out: Path,
    jobs: int | None,
    manifest: dict[str, Any],
) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """Draw the jobs whose inputs changed since `manifest` (updated in place) and drop the files
    they no longer write; returns every job's page entries and those of the jobs drawn now."""
    global _OUT, _FORMATS
    code = _code_version()
    inputs = [_fingerprint(target, formats, code) for target in targets]
    done = {
        job.key: manifest[job.key]["entries"]
        for job in job_list
        if _up_to_date(manifest.get(job.key), inputs[job.target], out)
    }
    stale = [job for job in job_list if job.key not in done]
    _TARGETS[:], _OUT, _FORMATS = targets, out, formats
    drawn = _draw_all(stale, jobs, {job.target for job in stale})
    for job in stale:
        record = manifest.get(job.key)
        old = record.get("entries", []) if isinstance(record, dict) else []
        new = drawn.get(job.key, [])
        _remove_left_over(out, old, new)
        runs = [path_from(r, out) for r in _runs_of(targets[job.target])]
        manifest[job.key] = {"inputs": inputs[job.target], "entries": new, "runs": runs}
        done[job.key] = new
    return done, {job.key: done[job.key] for job in stale}


def _sections(
    targets: list[Any], folders: list[str], job_list: list[Job], done: dict[str, list[dict]]
) -> list[Section]:
    """The page's sections: the comparison first, then one per group."""
    sections = []
    for t, target in enumerate(targets):
        entries = [
            Entry(e["path"], e["name"], e["family"], e["caption"])
            for job in job_list
            if job.target == t
            for e in done[job.key]
        ]
        if isinstance(target, RunGroup):
            sections.append(Section(target.title, folders[t], target.runs, target.varying, entries))
        elif entries:
            title = f"Comparison: {target.title}"
            sections.insert(0, Section(title, "compare", _runs_of(target), {}, entries))
    return sections


def _write_index(out: Path, sections: list[Section], extra: Sequence[Extra]) -> Path:
    """index.html, opened by the doctor's findings, each linked to the figure that shows its
    evidence."""
    index = out / "index.html"
    links = [(r, {e.name: e.path for e in s.entries}) for s in sections for r in s.runs]
    index.write_text(page(sections, out, [Extra("Findings", findings_html(links)), *extra]))
    return index


def _names(target: Any, only: Sequence[str] | None) -> list[str]:
    registry = FIGURES if isinstance(target, RunGroup) else COMPARISONS
    return [n for n in (only or registry) if n in registry]


def _runs_of(target: Any) -> list[Run]:
    return (
        target.runs if isinstance(target, RunGroup) else [r for g in target.groups for r in g.runs]
    )


def _code_version(package: Path = Path(__file__).parent.parent) -> str:
    """Changes whenever a figure module, the store's code that reads what they draw, or
    matplotlib does, so that new code redraws every figure (the page and the grouping are
    rebuilt at every call anyway)."""
    import matplotlib

    figures = [p for p in sorted(package.glob("plots/*.py")) if p.stem not in ("page", "groups")]
    files = figures + sorted(package.glob("store/*.py"))
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return hashlib.sha1(repr([matplotlib.__version__, *stats]).encode()).hexdigest()


def _fingerprint(target: Any, formats: Sequence[str], code: str) -> str:
    """What a target's figures are drawn from: its runs' stored files and statuses (a run that
    was running when last drawn and has since died is `crashed` with the same files), the
    formats, the code."""
    what = [code, list(formats), getattr(target, "label", "compare")]
    what += [[str(r.path), r.status, r.inputs()] for r in _runs_of(target)]
    return hashlib.sha1(json.dumps(what).encode()).hexdigest()


def _read_manifest(out: Path) -> dict[str, Any]:
    try:
        data = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _up_to_date(record: Any, inputs: str, out: Path) -> bool:
    """Whether a manifest record was drawn from these inputs, is as written, and its files are
    all there (anything else is drawn again)."""
    if not isinstance(record, dict) or record.get("inputs") != inputs:
        return False
    entries = record.get("entries")
    return (
        isinstance(entries, list)
        and all(_entry(e) for e in entries)
        and all((out / f).exists() for f in _files(entries))
    )


def _entry(e: Any) -> bool:
    """Whether a manifest entry is one `_draw` writes: the page's fields and a list of files."""
    return (
        isinstance(e, dict)
        and all(isinstance(e.get(k), str) for k in ("path", "name", "family", "caption"))
        and isinstance(e.get("files"), list)
        and all(isinstance(f, str) and f for f in e["files"])
    )


def _remove_left_over(out: Path, old: list[dict], new: list[dict]) -> None:
    """Files a figure wrote last time but not now (an epoch no longer drawn, say)."""
    kept = {f for e in new for f in e["files"]}
    root = out.resolve()
    for f in set(_files(old)) - kept:
        path = (out / f).resolve()
        if path.parent.is_relative_to(root) and path.is_file():  # only what it names in `out`
            path.unlink()


def _files(entries: Any) -> list[str]:
    """The files a manifest record's entries name (none of an entry not as written)."""
    if not isinstance(entries, list):
        return []
    return [f for e in entries if _entry(e) for f in e["files"]]


def _drop_gone(out: Path, manifest: dict[str, Any], jobs: set[str], runs: set[str]) -> None:
    """Removes what earlier plots drew for figures these runs no longer have: a group whose runs
    are drawn in another group now (one group's top-level figures, once the runs form several),
    or whose runs are gone. No longer on the page, they would stay in the folder looking
    current. Figures of runs this call does not draw are left alone; folders go once empty."""
    for key in [k for k in manifest if k not in jobs]:
        record = manifest[key] if isinstance(manifest[key], dict) else {}
        drawn_from = record.get("runs")
        known = (
            [(out / r).resolve() for r in drawn_from if isinstance(r, str) and r]
            if isinstance(drawn_from, list)
            else []
        )
        if known and not any(str(r) in runs or not r.exists() for r in known):
            continue  # another call's runs, still there
        del manifest[key]
        _remove_left_over(out, record.get("entries"), [])  # type: ignore[arg-type]
        folder = out / key.rpartition("/")[0]
        if folder.parent == out and not folder.is_symlink() and folder.is_dir():
            if not any(folder.iterdir()):
                folder.rmdir()


def _draw_all(stale: list[Job], jobs: int | None, targets: set[int]) -> dict[str, list[dict]]:
    """Draw the stale jobs, in `jobs` forked worker processes when there is more than one."""
    if not stale:
        return {}
    for t in targets:
        for run in _runs_of(_TARGETS[t]):
            run.preload()  # once, here: forked workers share what was read
    order = sorted(stale, key=lambda job: -SLOW.get(job.name, 1))
    workers = min(jobs or _cores(), len(order))
    results: dict[str, list[dict]] = {}
    if workers > 1 and "fork" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("fork")
        try:
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                for key, entries in pool.map(_draw, order):
                    results[key] = entries
        except BrokenProcessPool:
            warnings.warn("a figure worker process died; drawing the rest here", stacklevel=2)
    for job in order:
        if job.key not in results:
            key, entries = _draw(job)
            results[key] = entries
    return results


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _draw(job: Job) -> tuple[str, list[dict]]:
    """Draw one registered figure of its target and save it in every format; returns its page
    entries (files relative to the output folder). A broken figure warns, never stops the rest."""
    target = _TARGETS[job.target]
    spec = (FIGURES if isinstance(target, RunGroup) else COMPARISONS)[job.name]
    what = f"figure {job.name} for {job.folder or 'runs'}"
    try:
        rendered = spec.draw(target)
    except Exception as exc:  # noqa: BLE001 - one broken figure must not stop the rest
        warnings.warn(f"{what} failed: {type(exc).__name__}: {exc}", stacklevel=2)
        plt.close("all")
        return job.key, []
    if rendered is None:
        plt.close("all")
        return job.key, []
    family = spec.draw.__module__.rsplit(".", 1)[-1]
    folder = _OUT / job.folder
    entries = []
    items = rendered.items() if isinstance(rendered, dict) else [("", rendered)]
    for suffix, fig in items:
        stem = f"{job.name}_{suffix}" if suffix else job.name
        folder.mkdir(parents=True, exist_ok=True)
        fit_titles(fig)
        files = _save(fig, folder / stem, what)
        plt.close(fig)
        if files:
            caption = spec.describe(target)
            entries.append(
                {
                    "path": files[0],
                    "name": stem,
                    "family": family,
                    "caption": caption,
                    "files": files,
                }
            )
    return job.key, entries


def _save(fig: Any, stem: Path, what: str) -> list[str]:
    """`fig` as `stem`.FORMAT in every format; returns the files written, relative to the
    output folder. A format that fails warns and the others are still written."""
    files = []
    for fmt in _FORMATS:
        path = stem.with_name(f"{stem.name}.{fmt}")
        try:
            # zlib level 3: a few percent larger files, written in half the time of 6.
            extra = {"pil_kwargs": {"compress_level": 3}} if fmt == "png" else {}
            fig.savefig(path, dpi=110, **extra)
        except Exception as exc:  # noqa: BLE001 - one broken figure must not stop the rest
            warnings.warn(f"{what} could not be saved: {type(exc).__name__}: {exc}", stacklevel=3)
            continue
        files.append(path.relative_to(_OUT).as_posix())
    return files


__all__ = ["FIGURES", "Extra", "group_runs", "plot"]
