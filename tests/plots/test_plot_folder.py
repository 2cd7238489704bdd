"""`netprobe plot` on a real results folder: a mix of runs, sweeps, a crashed run and one still
being written; readable group names, the mapping file, skipping unchanged figures, refusals, and
the report page loaded in a real browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from netprobe.store import write_json
from tests.helpers import netprobe_cmd

BROWSER_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def netprobe(*args: str) -> subprocess.CompletedProcess:
    return netprobe_cmd(*args, timeout=600)  # a whole folder's figures on a busy machine


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, train_tiny) -> Path:
    """outputs/ as a user leaves it after a few studies."""
    root = tmp_path_factory.mktemp("outputs")
    small = ["model=cnn", "model.width=4", "model.hidden=16", "trainer.epochs=1"]
    train_tiny(root / "single" / "all", *small, "probes=all")
    train_tiny(root / "single" / "grad", *small, "probes=[gradients]")
    for seed in (0, 1):
        train_tiny(root / "seeds" / str(seed), *small, "probes=[gradients,rwc]", f"seed={seed}")
    for init in ("default", "ones", "orthogonal"):
        train_tiny(root / "inits" / init, *small, "probes=[weights,activations]", f"init={init}")
    # A run whose process died mid-way: run.json still says running, its last part is cut off.
    crashed = root / "crashed"
    shutil.copytree(root / "seeds" / "0", crashed)
    info = json.loads((crashed / "run.json").read_text())
    write_json(crashed / "run.json", {**info, "status": "running", "pid": 2**22 + 7, "seed": 5})
    part = sorted((crashed / "scalars").glob("part-*.parquet"))[-1]
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    # A run still being written: a live process, a part file under its temporary name.
    live = root / "live"
    shutil.copytree(root / "seeds" / "1", live)
    info = json.loads((live / "run.json").read_text())
    write_json(live / "run.json", {**info, "status": "running", "pid": os.getpid(), "seed": 6})
    (live / "scalars" / ".part-000099.parquet.tmp-1").write_bytes(b"PAR1 half written")
    return root


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("run.json"))


def test_any_folder_plots_with_readable_group_names(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "figures"
    done = netprobe("plot", str(folder), "--out", str(out), "--jobs", "2")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    mapping = json.loads((out / "groups.json").read_text())
    # Every run named exactly once, in the group whose folder holds its figures, by its path
    # from the figures' folder (which a results tree moved whole keeps).
    named = sorted((out / r["path"]).resolve() for g in mapping for r in g["runs"])
    assert named == sorted(p.resolve() for p in run_dirs(folder))
    assert all(not Path(r["path"]).is_absolute() for g in mapping for r in g["runs"])
    for group in mapping:
        assert 0 < len(group["folder"]) <= 60, group["folder"]
        assert re.fullmatch(r"[\w=.,+-]+", group["folder"]), group["folder"]
        assert (out / group["folder"]).is_dir()
        # Named only by keys that differ and exist in all runs: no absent probes' settings.
        assert "None" not in group["folder"] and "=__" not in group["folder"]
        assert all(not k.startswith("probes.") for k in group["differing"])
    by_probes = {g["differing"].get("probes") for g in mapping}
    assert {"gradients", "gradients+rwc", "activations+weights"} <= by_probes
    inits = {g["differing"]["init.name"] for g in mapping if "init.name" in g["differing"]}
    assert {"default", "ones", "orthogonal"} <= inits
    statuses = {Path(r["path"]).name: r["status"] for g in mapping for r in g["runs"]}
    assert statuses["crashed"] == "crashed" and statuses["live"] == "running"
    # The page lists every run (no "… and N more") with its status and the group mapping.
    page = (out / "index.html").read_text().replace("<wbr>", "")  # line-break hints
    for path in run_dirs(folder):
        assert f"{path.parent.name}/{path.name}</a>" in page
    assert "more</p>" not in page and "status-crashed" in page
    assert (out / "compare" / "compare_curves.png").exists()


def test_a_second_plot_of_an_unchanged_folder_draws_nothing(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "figures"
    first = netprobe("plot", str(folder / "seeds"), "--out", str(out))
    assert first.returncode == 0, first.stderr
    listed = first.stdout.splitlines()
    stamps = {p: (out / p).stat().st_mtime_ns for p in os.listdir(out) if p.endswith(".png")}
    again = netprobe("plot", str(folder / "seeds"), "--out", str(out))
    assert again.returncode == 0, again.stderr
    assert "0 figures drawn" in again.stderr
    assert again.stdout.splitlines() == listed  # the same files, listed as before
    assert stamps == {p: (out / p).stat().st_mtime_ns for p in stamps}
    # A new part file (the run went on) redraws that group's figures.
    part = sorted((folder / "seeds" / "1" / "scalars").glob("part-*.parquet"))[0]
    shutil.copy(part, tmp_path / "saved.parquet")
    try:
        os.utime(part, ns=(part.stat().st_atime_ns, part.stat().st_mtime_ns + 10**9))
        third = netprobe("plot", str(folder / "seeds"), "--out", str(out))
        assert third.returncode == 0 and "0 figures drawn" not in third.stderr
    finally:
        shutil.copy(tmp_path / "saved.parquet", part)


def test_the_code_version_follows_the_figures_and_the_store(tmp_path: Path) -> None:
    """Figures are redrawn when the code that draws them changes: a figure module, or the store
    that reads what they draw; the page's own modules are rebuilt at every call anyway."""
    from netprobe.plots import _code_version

    package = Path(_code_version.__defaults__[0])
    copy = tmp_path / "netprobe"
    for folder in ("plots", "store"):
        shutil.copytree(package / folder, copy / folder)
    version = _code_version(copy)
    for name in ("plots/page.py", "plots/groups.py"):
        os.utime(copy / name, ns=(0, 10**9))
        assert _code_version(copy) == version
    for name in ("plots/curves.py", "store/reader.py"):
        assert (copy / name).exists()
        os.utime(copy / name, ns=(0, 10**9))
        assert _code_version(copy) != version
        version = _code_version(copy)


def test_figures_of_a_group_no_longer_drawn_are_removed(folder: Path, tmp_path: Path) -> None:
    """One group's figures sit at the top of the output folder; once the folder holds a second
    group, each gets a folder of its own, and the top-level figures of before (no longer on the
    page, no longer updated) are gone rather than left looking current. Plotting some of the
    runs again leaves the other groups' figures alone."""
    out = tmp_path / "figures"
    seeds, grad = str(folder / "seeds"), str(folder / "single" / "grad")
    first = netprobe("plot", seeds, "--out", str(out))
    assert first.returncode == 0, first.stderr
    top = [p for p in first.stdout.splitlines() if Path(p).parent == out]
    assert any(p.endswith("training_curves.png") for p in top)
    second = netprobe("plot", seeds, grad, "--out", str(out))
    assert second.returncode == 0, second.stderr
    listed = {Path(p) for p in second.stdout.splitlines() if p.endswith(".png")}
    assert listed and all(p.parent != out and p.exists() for p in listed)
    on_disk = set(out.rglob("*.png"))
    assert on_disk == listed, sorted(map(str, on_disk - listed))
    folders = {
        "seeds" if "seeds" in g["runs"][0]["path"] else "grad": g["folder"]
        for g in json.loads((out / "groups.json").read_text())
    }
    # The grad run alone: its figures move to the top; the seeds group's folder stays as it was.
    third = netprobe("plot", grad, "--out", str(out))
    assert third.returncode == 0, third.stderr
    now = {Path(p) for p in third.stdout.splitlines() if p.endswith(".png")}
    assert now and all(p.parent == out for p in now)
    seeds_figures = {p for p in listed if p.parent.name == folders["seeds"]}
    assert seeds_figures and set(out.rglob("*.png")) == now | seeds_figures
    assert not (out / folders["grad"]).exists()
    # Only what the manifest names inside the output folder is ever removed.
    outside = tmp_path / "mine.png"
    outside.write_bytes(b"a user's file")
    manifest = json.loads((out / ".netprobe-plot.json").read_text())
    (out / "a").write_bytes(b"another file of the user's")
    # Records as a plot writes them but for their files: of runs gone, so they are dropped.
    entry = {"path": "x.png", "name": "x", "family": "x", "caption": "x"}
    gone = {"inputs": "", "runs": [str(tmp_path / "no-such-run")]}
    manifest["gone/figure"] = {**gone, "entries": [{**entry, "files": ["../mine.png"]}]}
    manifest["broken/figure"] = {"entries": "not a list", "runs": []}
    manifest["odd/figure"] = {**gone, "entries": [{**entry, "files": "ab"}]}  # no file "a"
    (tmp_path / "elsewhere").mkdir()
    (out / "linked").symlink_to(tmp_path / "elsewhere")  # a folder of the user's, linked
    manifest["linked/figure"] = {**gone, "entries": [{**entry, "files": ["linked/x.png"]}]}
    current = "/training_curves"  # one of the figures drawn now, its record damaged
    manifest[current] = {**manifest[current], "entries": [1]}
    (out / ".netprobe-plot.json").write_text(json.dumps(manifest))
    fourth = netprobe("plot", grad, "--out", str(out))
    assert fourth.returncode == 0 and "1 figures drawn" in fourth.stderr, fourth.stderr
    assert outside.exists() and (out / "a").exists() and (out / "training_curves.png").exists()
    left = json.loads((out / ".netprobe-plot.json").read_text())
    assert not {"gone/figure", "broken/figure", "odd/figure", "linked/figure"} & set(left)
    assert (out / "linked").is_symlink()


def test_a_results_tree_moved_whole_keeps_its_figures(folder: Path, tmp_path: Path) -> None:
    """The manifest finds runs from the figures' folder: after the tree (runs and figures) is
    moved, plotting one group again leaves the other group's figures in place."""
    tree = tmp_path / "tree"
    shutil.copytree(folder / "seeds", tree / "seeds")
    shutil.copytree(folder / "single" / "grad", tree / "grad")
    first = netprobe("plot", str(tree / "seeds"), str(tree / "grad"), "--out", str(tree / "fig"))
    assert first.returncode == 0, first.stderr
    drawn = {Path(p).relative_to(tree) for p in first.stdout.splitlines() if p.endswith(".png")}
    groups = json.loads((tree / "fig" / "groups.json").read_text())
    seeds_folder = next(g["folder"] for g in groups if "seeds" in g["runs"][0]["path"])
    moved = tmp_path / "moved"
    tree.rename(moved)
    again = netprobe("plot", str(moved / "grad"), "--out", str(moved / "fig"))
    assert again.returncode == 0, again.stderr
    grad = {Path(p).relative_to(moved) for p in again.stdout.splitlines() if p.endswith(".png")}
    seeds = {p for p in drawn if p.parent.name == seeds_folder}
    assert (
        seeds
        and grad
        and {p.relative_to(moved) for p in moved.rglob("fig/**/*.png")} == (seeds | grad)
    )


@pytest.mark.parametrize(
    "args, words",
    [
        (["--out", "FILE"], ["is a file"]),
        (["--format", "png,gif"], ["'gif'", "png, svg, pdf"]),
        (["--only", "nope"], ["'nope'", "training_curves"]),
        (["--jobs", "0"], ["--jobs", "'0'"]),
        (["--format", ","], ["format", "png, svg, pdf"]),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(folder: Path, tmp_path: Path, args, words):
    target = tmp_path / "a-file.txt"
    target.write_text("keep me")
    args = [str(target) if a == "FILE" else a for a in args]
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    done = netprobe("plot", str(folder / "seeds"), *args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and all(w in lines[0] for w in words), done.stderr
    assert target.read_text() == "keep me"
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before


def test_a_missing_path_is_one_line(tmp_path: Path) -> None:
    done = netprobe("plot", str(tmp_path / "nowhere"))
    assert done.returncode == 2 and "nowhere" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        pytest.skip("chromium is not installed (.ci/run installs Debian's package)")
    assert found, "CI=true but no chromium: .ci/run should have installed it"
    return found


def browse(page: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    return subprocess.run(
        [chromium(), *BROWSER_FLAGS, f"--user-data-dir={profile}", *extra, page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_report_page_in_a_real_browser(folder: Path, tmp_path: Path) -> None:
    """One run's page: every image loads, the page stays short, the contents link to sections."""
    out = tmp_path / "figures"
    assert netprobe("plot", str(folder / "single" / "all"), "--out", str(out)).returncode == 0
    dom = browse(out / "index.html", tmp_path, "--window-size=1400,1000",
                 "--virtual-time-budget=10000", "--dump-dom")  # fmt: skip
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", dom.stdout).group(1)
    attrs = dict(re.findall(r'data-(\w+)="(\d+)"', body))
    assert int(attrs["images"]) >= 20 and attrs["broken"] == "0", attrs
    assert int(attrs["height"]) < 4000, attrs
    # Every contents link points at a section of the page.
    targets = set(re.findall(r"<nav>.*?</nav>", dom.stdout, re.S)[0].split('href="#')[1:])
    ids = set(re.findall(r'id="([^"]+)"', dom.stdout))
    assert {t.split('"')[0] for t in targets} <= ids
    shot = tmp_path / "page.png"
    done = browse(out / "index.html", tmp_path, "--window-size=1400,1200", f"--screenshot={shot}",
                  "--virtual-time-budget=10000", "--hide-scrollbars")  # fmt: skip
    assert done.returncode == 0 and shot.stat().st_size > 50_000
