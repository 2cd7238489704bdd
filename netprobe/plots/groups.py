"""Runs grouped by everything but the seed, each group named by what a person would say differs."""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any

from netprobe.config import bookkeeping
from netprobe.plots.common import RunGroup
from netprobe.store import Run

MAX_NAME = 60  # characters in a group's folder name
HASH_CHARS = 6


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


def differing(configs: list[dict[str, Any]]) -> list[str]:
    """Keys that tell configs apart: values that differ among configs that all have the key, and,
    for a section whose members differ (`probes.rwc.*` in some runs only), the section itself."""
    common = set.intersection(*(set(c) for c in configs))
    keys = sorted(k for k in common if len({str(c[k]) for c in configs}) > 1)
    # A group option that differs (model=cnn vs mlp) names the group; the keys it brings along
    # (model.width, data.image_size...) differ because of it and would only lengthen the name.
    chosen = {k.removesuffix(".name") for k in keys if k.endswith(".name")}
    keys = [k for k in keys if k.endswith(".name") or k.split(".")[0] not in chosen]
    sections = {k.split(".")[0] for c in configs for k in set(c) - common if k.count(".") >= 2}
    keys += [s for s in sections if len({members(c, s) for c in configs}) > 1]
    # What a person names first: model, data, init, optimizer; then the rest in order.
    first = ["model", "data", "init", "optim"]
    top = lambda k: first.index(k.split(".")[0]) if k.split(".")[0] in first else len(first)  # noqa: E731
    return sorted(keys, key=lambda k: (top(k), k))


def members(config: dict[str, Any], section: str) -> str:
    """The sub-sections of `section` that a config has, as `a+b` (`probes` → `gradients+rwc`)."""
    names = {k.split(".")[1] for k in config if k.startswith(f"{section}.") and k.count(".") >= 2}
    return "+".join(sorted(names)) or "none"


def value_of(config: dict[str, Any], key: str) -> Any:
    return config[key] if key in config else members(config, key)


def folder_name(parts: list[str], identity: str) -> str:
    """`k=v,k=v` made safe for a file name, at most MAX_NAME characters; a longer one is cut and
    ends in a short hash of `identity` (the group's whole config), stable across calls."""
    name = "".join(c if c.isalnum() or c in "=-_.,+" else "_" for c in ",".join(parts))
    if name and len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha1(identity.encode()).hexdigest()[:HASH_CHARS]
    return f"{name[: MAX_NAME - HASH_CHARS - 1].rstrip(',_')}-{digest}".lstrip("-")


def group_runs(runs: list[Run]) -> list[RunGroup]:
    """Runs whose configs agree on everything but the seed and the bookkeeping form one group,
    named by the keys that differ between groups (one group: no name)."""
    # The seed and the bookkeeping (logging, checkpoints, output) differ between runs without
    # making them different experiments.
    configs = [
        {k: v for k, v in _config(r).items() if k != "seed" and not bookkeeping(k)} for r in runs
    ]
    by_config: dict[str, list[int]] = {}
    for i, cfg in enumerate(configs):
        by_config.setdefault(repr(sorted((k, str(v)) for k, v in cfg.items())), []).append(i)
    for indices in by_config.values():
        _warn_repeated_seeds([runs[i] for i in indices])
    if len(by_config) == 1:
        return [RunGroup(list(runs))]
    firsts = [configs[members_[0]] for members_ in by_config.values()]
    # A run without its config (one that crashed before writing it) has only what run.json
    # names: the keys that tell the others apart come from theirs, not from what it lacks.
    full = [configs[m[0]] for m in by_config.values() if runs[m[0]].config is not None]
    keys = differing(full if len(full) > 1 else firsts)
    groups = []
    for identity, indices in by_config.items():
        cfg = configs[indices[0]]
        values = {k: value_of(cfg, k) for k in keys}
        parts = [f"{k.removesuffix('.name')}={_short_value(v)}" for k, v in values.items()]
        shown = [p for k, p in zip(keys, parts) if k.split(".")[0] not in ("model", "data", "init")]
        group = RunGroup(
            [runs[i] for i in indices],
            folder_name(parts, identity),
            values,
            ", ".join(shown),
        )
        groups.append(group)
    _unique_labels(groups, list(by_config))
    return sorted(groups, key=lambda g: g.label)


def _warn_repeated_seeds(runs: list[Run]) -> None:
    """Runs of one experiment with one seed (a run copied, a job run twice) count twice in its
    mean and spread: said, not hidden."""
    by_seed: dict[Any, list[Run]] = {}
    for run in runs:
        seed = run.info.get("seed")
        if seed is not None:
            by_seed.setdefault(seed, []).append(run)
    for seed, same in by_seed.items():
        if len(same) > 1:
            where = ", ".join(str(r.path) for r in same)
            warnings.warn(
                f"{len(same)} runs of one config share seed {seed} ({where}); each counts in "
                "their group's mean and spread",
                stacklevel=3,
            )


def _config(run: Run) -> dict[str, Any]:
    """The run's flat config; a run without one (made with `netprobe.attach`) by what its run.json
    names."""
    if run.config is not None:
        return flat(run.config)
    return {f"{k}.name": run.info[k] for k in ("model", "data", "init") if k in run.info}


def _short_value(value: Any, width: int = 24) -> str:
    """A value short enough for a folder name: a long `a+b+c` list keeps its first names and
    counts the rest (`activations+augmentation+7more`), anything else is cut."""
    text = str(value)
    if len(text) <= width:
        return text
    items = text.split("+")
    if len(items) > 1:
        kept = []
        while items and len("+".join([*kept, items[0]])) <= width - 7:
            kept.append(items.pop(0))
        return "+".join(kept) + f"+{len(items)}more"
    return text[: width - 1] + "…"


def _unique_labels(groups: list[RunGroup], identities: list[str]) -> None:
    """Groups that the differing keys cannot tell apart get their config's hash appended."""
    seen: dict[str, int] = {}
    for group in groups:
        seen[group.label] = seen.get(group.label, 0) + 1
    for group, identity in zip(groups, identities):
        if seen[group.label] > 1:
            digest = hashlib.sha1(identity.encode()).hexdigest()[:HASH_CHARS]
            group.label = f"{group.label[: MAX_NAME - HASH_CHARS - 1]}-{digest}".lstrip("-")


def mapping(groups: list[RunGroup], out: Path) -> list[dict[str, Any]]:
    """Group → folder, differing keys and runs (path from `out`, seed, status): the file beside
    the figures in `out`."""
    return [
        {
            "group": group.label or "all runs",
            "folder": group.label,
            "differing": {k: _plain(v) for k, v in group.varying.items()},
            "runs": [
                {"path": path_from(r, out), "seed": r.info.get("seed"), "status": r.status}
                for r in group.runs
            ],
        }
        for group in groups
    ]


def path_from(run: Run, out: Path) -> str:
    """Where a run is, from the figures' folder `out`: a results tree copied or moved whole,
    figures and all, still finds its runs (an absolute path, as earlier plots wrote, reads the
    same)."""
    return os.path.relpath(Path(run.path).resolve(), out.resolve())


def _plain(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)
