"""index.html (netprobe/plots/page.py): what its title counts, that its contents name the
sections they link to, and that the runs table fits a 1200-pixel window in a real browser."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from netprobe.plots.page import Extra, Section, page
from netprobe.store import Results
from tests.helpers import crash
from tests.plots.test_plot_folder import browse

PROBES = ["gradients", "gradient_flow", "weights", "rwc", "optim_dynamics", "activations",
          "correlation", "augmentation", "channels"]  # fmt: skip


@dataclass
class FakeRun:
    """What the page reads of a run: its path, status and run.json."""

    path: Path
    status: str = "completed"
    info: dict = field(default_factory=dict)

    def results(self) -> Results:
        return Results(self.info.get("final") or {}, True, self.info.get("epochs_done"))


def sections(root: Path, groups: int, runs: int) -> list[Section]:
    info = {"seed": 0, "epochs_done": 150, "steps_done": 58_650, "best_val_acc": 0.9412,
            "final": {"val_acc": 0.9377, "val_loss": 0.21734}, "probe_overhead": 0.1234,
            "started_at": "2026-11-30T10:00:00+00:00", "ended_at": "2026-11-30T12:00:00+00:00",
            "probes": PROBES}  # fmt: skip
    return [
        Section(
            f"vgg19 on cifar100, init kaiming_uniform (optim.lr=0.00{g}, probes=activations+7more)",
            f"group{g}",
            [
                FakeRun(root / f"sweep-{g}" / f"optim.lr=0.00{g},seed={s}", info=info)
                for s in range(runs)
            ],  # fmt: skip
            {"optim.lr": g},
        )
        for g in range(groups)
    ]


def test_the_title_counts_runs_and_groups(tmp_path: Path) -> None:
    for groups, runs, title in [(1, 1, "1 run in 1 group"), (1, 3, "3 runs in 1 group"),
                                (2, 3, "6 runs in 2 groups")]:  # fmt: skip
        text = page(sections(tmp_path, groups, runs), tmp_path)
        assert re.search("<title>(.*)</title>", text).group(1) == f"netprobe — {title}"


def test_contents_links_name_the_headings_they_point_to(tmp_path: Path) -> None:
    extra = [Extra("Findings", "<p>none</p>"), Extra("Timings", "<p>fast</p>")]
    text = page(sections(tmp_path, 2, 1), tmp_path, extra)
    nav = re.search("<nav>(.*)</nav>", text, re.S).group(1)
    for anchor, name in re.findall(r"<a href='#(extra-\d|runs)'>([^<]*)</a>", nav):
        heading = re.search(f"<h2 id='{anchor}'>([^<]*)</h2>", text).group(1)
        assert heading.startswith(name), (anchor, name, heading)
    assert "Timings" in nav and "Summary" not in nav


def test_the_runs_table_fits_a_1200_pixel_window(tmp_path: Path) -> None:
    index = tmp_path / "figures" / "index.html"
    index.parent.mkdir()
    index.write_text(page(sections(tmp_path, 3, 3), index.parent))
    dom = browse(index, tmp_path, "--window-size=1200,1000", "--virtual-time-budget=5000",
                 "--dump-dom")  # fmt: skip
    assert dom.returncode == 0, dom.stderr[-2000:]
    width = re.search(r'data-width="(\d+)"', dom.stdout)
    assert width and int(width.group(1)) <= 1200, width and width.group(0)


def test_the_groups_table_fits_a_1200_pixel_window_with_long_keys(tmp_path: Path) -> None:
    """A folder of runs with other probe sets: `probes=activations+augmentation+...` has no
    space to break at, and the groups table ran off the page."""
    index = tmp_path / "figures" / "index.html"
    index.parent.mkdir()
    groups = sections(tmp_path, 2, 1)
    groups[1].differing["probes"] = "+".join(PROBES)
    index.write_text(page(groups, index.parent))
    dom = browse(index, tmp_path, "--window-size=1200,1000", "--virtual-time-budget=5000",
                 "--dump-dom")  # fmt: skip
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "differing config keys" in dom.stdout
    width = re.search(r'data-width="(\d+)"', dom.stdout)
    assert width and int(width.group(1)) <= 1200, width and width.group(0)


def test_the_runs_table_gives_a_killed_runs_last_values_as_such(tiny_run, tmp_path: Path) -> None:
    """A run killed before it closed shows the last validation values it recorded, each marked
    as the last recorded with its epoch, not a blank final value."""
    run = crash(tiny_run("trainer.epochs=2").path)
    last = run.results().values
    text = page([Section("killed", "group0", [run], {})], tmp_path)
    cells = re.findall(r"<td class='num'>([^<]*)<br><small>([^<]*)</small></td>", text)
    assert cells == [(f"{last['val_acc']:.1%}", "last recorded, epoch 2"),
                     (f"{last['val_loss']:.4g}", "last recorded, epoch 2")]  # fmt: skip
