"""index.html: a static report page beside the figures (no server, no network, opens from disk):
the run or sweep summary, then a section per group of runs, its figures grouped by probe family."""

from __future__ import annotations

import html
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netprobe.store import Run, run_seconds

# Figure families in page order: the module a figure is drawn by, and its heading.
FAMILIES = {
    "compare": "Comparison across the sweep",
    "curves": "Training curves",
    "gradients": "Gradients",
    "gradient_flow": "Gradient flow",
    "weights": "Weights",
    "rwc": "Relative weight change",
    "optim_dynamics": "Optimization dynamics",
    "activations": "Features (activations)",
    "correlation": "Layer correlations",
    "augmentation": "Augmentation",
    "channels": "Channel gradients",
}


@dataclass
class Entry:
    """One drawn figure: its file (relative to the page), registered name and caption."""

    path: str
    name: str
    family: str
    caption: str


@dataclass
class Section:
    """What the page shows of one group of runs (or of the sweep comparison)."""

    title: str
    folder: str
    runs: list[Run]
    differing: dict[str, Any]
    entries: list[Entry] = field(default_factory=list)


@dataclass
class Extra:
    """A summary section placed at the top of the page, above the runs (findings, say)."""

    title: str
    body_html: str


STYLE = """
*{box-sizing:border-box}
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
nav{position:fixed;top:0;left:0;bottom:0;width:250px;overflow:auto;padding:12px;
 background:#f0f2f5;border-right:1px solid #ddd;font-size:13px}
nav a{color:#1a4d8f;text-decoration:none}nav a:hover{text-decoration:underline}
nav ul{list-style:none;margin:2px 0 6px;padding-left:12px}nav>ul{padding-left:0}
main{margin-left:250px;padding:12px 20px;max-width:1900px}
h1{font-size:20px;margin:4px 0 10px}h2{font-size:17px;margin:18px 0 6px}
h3{font-size:15px;margin:10px 0 5px;color:#333}
table{border-collapse:collapse;font-size:12.5px;margin:4px 0 10px;background:#fff}
th,td{border:1px solid #ddd;padding:3px 5px;text-align:left;vertical-align:top}
.groups td{overflow-wrap:anywhere}
th{background:#eef1f5}th.group{background:#f6f7f9;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
.status-completed{color:#1b7f2a}.status-failed,.status-diverged,.status-crashed{color:#b3261e}
.status-running,.status-interrupted{color:#a05a00}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:10px}
.grid figure.wide{grid-column:span 2}
figure{margin:0;background:#fff;border:1px solid #ddd;padding:5px}
figure img{width:100%;height:190px;object-fit:contain;display:block;cursor:zoom-in}
figure.wide img{height:300px}
figcaption{font-size:11.5px;color:#444;margin-top:3px;display:-webkit-box;
 -webkit-line-clamp:3;-webkit-box-orient:vertical;overflow:hidden}
figcaption b{color:#222}
details>summary{cursor:pointer;font-size:17px;font-weight:600;margin:16px 0 6px}
.view{display:none;position:fixed;inset:0;background:rgba(0,0,0,.85);z-index:10;
 padding:16px;text-align:center}
.view:target{display:block}
.view img{max-width:100%;max-height:calc(100vh - 90px);background:#fff}
.view p{color:#eee;margin:6px}.view a{color:#9cf}
#broken{display:none;background:#fde7e7;border:1px solid #b3261e;padding:6px 10px}
"""

# Opens the group a table-of-contents link points into, and says when figure files are missing
# (a page copied without its folders); the page's size and image counts stay readable in the DOM.
SCRIPT = """
function openTarget(){var t=document.getElementById(location.hash.slice(1));
 for(;t;t=t.parentElement){if(t.tagName==='DETAILS')t.open=true;}}
window.addEventListener('hashchange',openTarget);openTarget();
window.addEventListener('load',function(){
 var imgs=[].slice.call(document.querySelectorAll('img.thumb'));
 var bad=imgs.filter(function(i){return !(i.complete&&i.naturalWidth>0);});
 document.body.dataset.images=imgs.length;document.body.dataset.broken=bad.length;
 document.body.dataset.height=document.documentElement.scrollHeight;
 document.body.dataset.width=document.documentElement.scrollWidth;
 if(bad.length){var b=document.getElementById('broken');b.style.display='block';
  b.textContent=bad.length+' of '+imgs.length+' figure files could not be loaded.';}});
"""


def page(
    sections: Sequence[Section],
    out: Path,
    extra: Sequence[Extra] = (),
) -> str:
    """The whole index.html. `extra` sections go first, right under the heading: the one place
    for summaries that other commands add (findings, say)."""
    e = html.escape
    parts = [
        "<!doctype html><html lang='en'><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width,initial-scale=1'>",
        f"<title>netprobe — {_count(sections)}</title>",
        f"<style>{STYLE}</style><body>",
        _nav(sections, extra),
        "<main><h1>netprobe report</h1><p id='broken'></p>",
    ]
    for i, section in enumerate(extra):
        parts.append(f"<h2 id='extra-{i}'>{e(section.title)}</h2>{section.body_html}")
    parts.append(f"<h2 id='runs'>Runs ({_count(sections)})</h2>")
    parts.append(_runs_table(sections, out))
    groups = [s for s in sections if s.folder != "compare"]
    if len(groups) > 1:
        parts.append(_groups_table(groups))
    for k, section in enumerate(sections):
        parts.append(_section(section, k, open_=k == 0 or len(sections) <= 2))
    parts.append(f"</main><script>{SCRIPT}</script></body></html>\n")
    return "\n".join(parts)


def _count(sections: Sequence[Section]) -> str:
    """`3 runs in 1 group`: the runs drawn, and the groups of seeds they form."""
    groups = [s for s in sections if s.folder != "compare"]
    n = sum(len(s.runs) for s in groups)
    return f"{n} run{'s' if n != 1 else ''} in {len(groups)} group{'s' if len(groups) != 1 else ''}"


def _anchor(k: int, family: str = "") -> str:
    return f"s{k}-{family}" if family else f"s{k}"


def _families(section: Section) -> list[tuple[str, list[Entry]]]:
    out: dict[str, list[Entry]] = {}
    for entry in section.entries:
        out.setdefault(entry.family, []).append(entry)
    order = list(FAMILIES)
    return sorted(out.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99)


def _nav(sections: Sequence[Section], extra: Sequence[Extra]) -> str:
    e = html.escape
    items = ["<nav><b>Contents</b><ul>"]
    items += [f"<li><a href='#extra-{i}'>{e(x.title)}</a></li>" for i, x in enumerate(extra)]
    items.append("<li><a href='#runs'>Runs</a></li>")
    for k, section in enumerate(sections):
        families = "".join(
            f"<li><a href='#{_anchor(k, fam)}'>{e(FAMILIES.get(fam, fam))}</a> ({len(items)})</li>"
            for fam, items in _families(section)
        )
        items.append(f"<li><a href='#{_anchor(k)}'>{e(section.title)}</a><ul>{families}</ul></li>")
    items.append("</ul></nav>")
    return "".join(items)


def _fmt(value: Any, kind: str = "") -> str:
    if value is None or value == "":
        return "—"
    if kind == "pct" and isinstance(value, (int, float)):
        return f"{value:.1%}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def duration(info: dict[str, Any]) -> str:
    """The time the run spent training (to its last write while it runs)."""
    seconds = run_seconds(info)
    if seconds is None:
        return "—"
    return f"{seconds / 60:.1f} min" if seconds >= 100 else f"{seconds:.1f} s"


def _runs_table(sections: Sequence[Section], out: Path) -> str:
    e = html.escape
    head = (
        "<table><tr><th>run</th><th>status</th><th>seed</th><th>epochs</th>"
        "<th>steps</th><th>best val acc</th><th>final val acc</th><th>final val loss</th>"
        "<th>duration</th><th>probe overhead</th><th>probes</th></tr>"
    )
    rows = [head]
    paths = [r.path.resolve() for s in sections for r in s.runs]
    # Runs named by their path below the folder that holds them all (`sweep/3`, not `3`).
    base = Path(os.path.commonpath(paths)).parent if paths else Path()
    for section in sections:
        if section.folder == "compare":
            continue
        # A row naming the group above its runs: as a column, its long title left no room.
        rows.append(f"<tr><th colspan='11' class='group'>{e(section.title)}</th></tr>")
        for run in section.runs:
            name = Path(os.path.relpath(run.path.resolve(), base)).as_posix()
            info, results = run.info, run.results()
            # A run that never closed shows where it stood when it stopped, marked as such.
            unfinished = not results.final and results.epochs is not None
            mark = f"<br><small>last recorded, epoch {results.epochs}</small>" if unfinished else ""
            final = results.values
            reason = info.get("error") or info.get("stop_reason") or ""
            status = e(run.status) + (
                f"<br><small>{e(str(reason)[:120])}</small>" if reason else ""
            )
            link = e(Path(os.path.relpath(run.path, out)).as_posix())
            shown = re.sub("([/,])", r"\1<wbr>", e(name))  # lines break after a / or a comma
            rows.append(
                f"<tr><td><a href='{link}'>{shown}</a></td>"
                f"<td class='status-{e(run.status)}'>{status}</td>"
                f"<td class='num'>{_fmt(info.get('seed'))}</td>"
                f"<td class='num'>{_fmt(info.get('epochs_done'))}</td>"
                f"<td class='num'>{_fmt(info.get('steps_done'))}</td>"
                f"<td class='num'>{_fmt(info.get('best_val_acc'), 'pct')}</td>"
                f"<td class='num'>{_fmt(final.get('val_acc'), 'pct')}{mark}</td>"
                f"<td class='num'>{_fmt(final.get('val_loss'))}{mark}</td>"
                f"<td class='num'>{duration(info)}</td>"
                f"<td class='num'>{_fmt(info.get('probe_overhead'), 'pct')}</td>"
                f"<td>{e(', '.join(info.get('probes') or []))}</td></tr>"
            )
    rows.append("</table>")
    return "".join(rows)


def _groups_table(groups: Sequence[Section]) -> str:
    """Group → folder, the config keys that tell it apart, and its runs."""
    e = html.escape
    # A key such as probes=a+b+c+... has no place to break: the table would run off the page.
    rows = [
        "<table class=groups><tr><th>group (folder)</th><th>differing config keys</th>"
        "<th>runs</th></tr>"
    ]
    for section in groups:
        keys = ", ".join(f"{k}={v}" for k, v in section.differing.items()) or "—"
        runs = ", ".join(f"{r.path.parent.name}/{r.path.name}" for r in section.runs)
        rows.append(
            f"<tr><td>{e(section.folder or '.')}</td><td>{e(keys)}</td><td>{e(runs)}</td></tr>"
        )
    rows.append("</table>")
    return "".join(rows)


def _section(section: Section, k: int, open_: bool) -> str:
    e = html.escape
    n = len(section.runs)
    count = f"{n} run{'s' if n != 1 else ''}"
    parts = [
        f"<details id='{_anchor(k)}'{' open' if open_ else ''}>"
        f"<summary>{e(section.title)} <small>({count})</small></summary>"
    ]
    if not section.entries:
        parts.append("<p>No figures: these runs stored nothing that a figure draws.</p>")
    for fam, entries in _families(section):
        parts.append(
            f"<h3 id='{_anchor(k, fam)}'>{e(FAMILIES.get(fam, fam))}</h3><div class='grid'>"
        )
        for j, entry in enumerate(entries):
            view = f"v{k}-{fam}-{j}"
            wide = " class='wide'" if fam in ("curves", "compare") else ""
            src = e(entry.path)
            parts.append(
                f"<figure{wide}><a href='#{view}'><img class='thumb' src='{src}' "
                f"alt='{e(entry.name)}'></a><figcaption title='{e(entry.caption)}'>"
                f"<b>{e(entry.name)}</b>: {e(entry.caption)}</figcaption></figure>"
                f"<div class='view' id='{view}'><p><a href='#{_anchor(k, fam)}'>close ✕</a> · "
                f"<a href='{src}'>open the file</a> · <b>{e(entry.name)}</b>: "
                f"{e(entry.caption)}</p><img src='{src}' loading='lazy' alt='{e(entry.name)}'>"
                "</div>"
            )
        parts.append("</div>")
    parts.append("</details>")
    return "".join(parts)
