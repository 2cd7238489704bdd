"""`netprobe ls`: sweeps listed together with mean ± std over seeds; sort, filter, columns, and
CSV/JSON that give back each run's run.json and config."""

from __future__ import annotations

import csv
import io
import json
import socket
import statistics
from pathlib import Path

import pytest
import yaml

from netprobe.cli import main as cli
from netprobe.listing import COLUMNS, flatten, list_runs, sweep_of, sweep_summary
from tests.helpers import crash


def fake_run(
    path: Path,
    seed: int,
    overrides: list[str],
    status: str = "completed",
    best: float | None = 0.5,
    lr: float = 0.001,
    **info: object,
) -> Path:
    (path / ".hydra").mkdir(parents=True)
    manifest = {"status": status, "model": "cnn", "data": "digits", "init": "default", "seed": seed,
                "epochs_done": 2, "steps_done": 20, "best_val_acc": best, "probes": ["gradients"],
                "started_at": "2026-01-01T12:00:00+00:00", "ended_at": "2026-01-01T12:01:05+00:00",
                "final": {"loss": 1.0 - (best or 0), "val_acc": best}, **info}  # fmt: skip
    (path / "run.json").write_text(json.dumps(manifest))
    config = {"seed": seed, "model": {"name": "cnn"}, "optim": {"name": "sgd", "lr": lr},
              "trainer": {"epochs": 2}, "name": "${model.name}-x"}  # fmt: skip
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    return path


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    """A sweep of three seeds and four single runs: failed, interrupted, crashed, damaged."""
    sweep = tmp_path / "multirun" / "2026-01-01" / "12-00-00-cnn"
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    for job, (seed, best) in enumerate([(0, 0.5), (42, 0.6), (123, 0.8)]):
        fake_run(sweep / str(job), seed, [f"seed={seed}", "model=cnn"], best=best)
    fake_run(tmp_path / "a-failed", 7, [], "failed", best=None, lr=0.05, error="ValueError: x")
    fake_run(tmp_path / "b-interrupted", 8, [], "interrupted", best=0.3, error="interrupted",
             probes=["gradients", "rwc"])  # fmt: skip
    # `running`, but its process (pid 2**22 + 1, above Linux's largest) is gone: crashed.
    host = socket.gethostname()
    fake_run(tmp_path / "c-crashed", 9, [], "running", best=0.2, pid=2**22 + 1, host=host)
    damaged = tmp_path / "d-damaged"
    damaged.mkdir()
    (damaged / "run.json").write_text('{"status": "compl')
    return tmp_path


def ls(*args: str) -> str:
    out = io.StringIO()
    paths = [a for a in args if not a.startswith("--")]
    kwargs = dict(a[2:].split("=", 1) for a in args if a.startswith("--"))
    columns = kwargs.pop("columns", None)
    list_runs(paths, columns=columns.split(",") if columns else None, out=out, **kwargs)
    return out.getvalue()


def test_ls_groups_runs_by_sweep_with_mean_and_std(mixed: Path):
    sweep = mixed / "multirun" / "2026-01-01" / "12-00-00-cnn"
    assert sweep_of(sweep / "1") == sweep.resolve() and sweep_of(mixed / "a-failed") is None
    text = ls(str(mixed))
    assert text.index(f"sweep {sweep.resolve()} (3 runs)") < text.index("seed=42")
    assert text.index("seed=42") < text.index("single runs")
    assert "model=cnn" not in text  # the same in every job: not what the sweep varied
    best = [0.5, 0.6, 0.8]
    expected = f"best_val_acc {statistics.mean(best):.4f} ± {statistics.stdev(best):.4f}"
    assert f"mean ± std over 3 runs: {expected}" in text
    text = ls(str(mixed), "--columns=status,reason,steps,duration,path")
    lines = {line.split("│")[-2].strip(): line for line in text.splitlines() if "│" in line}
    assert "ValueError: x" in lines[str(mixed / "a-failed")]
    assert "crashed" in lines[str(mixed / "c-crashed")]
    assert "damaged" in lines[str(mixed / "d-damaged")]
    assert "1m05s" in lines["0"] and "20" in lines["0"]  # duration and steps


def test_json_gives_back_every_runs_status_and_config(mixed: Path):
    listed = json.loads(ls(str(mixed), "--fmt=json"))
    by_path = {Path(item["path"]): item for item in listed}
    run_dirs = sorted(p.parent for p in mixed.rglob("run.json"))
    assert sorted(by_path) == run_dirs
    for run_dir, item in by_path.items():
        try:
            info = json.loads((run_dir / "run.json").read_text())
        except ValueError:
            assert item["status"] == "damaged" and item["info"] == {}
            assert item["reason"] == "unreadable run.json"
            continue
        assert item["info"] == info
        expected = "crashed" if run_dir.name == "c-crashed" else info["status"]
        assert item["status"] == expected
        reasons = {"a-failed": "ValueError: x", "b-interrupted": "interrupted",
                   "c-crashed": "its process is gone without closing the run"}  # fmt: skip
        assert item["reason"] == reasons.get(run_dir.name)  # null for a completed run
        config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
        assert item["config"]["optim.lr"] == config["optim"]["lr"]
        assert item["config"]["name"] == "cnn-x"  # interpolations resolved
        assert set(item["config"]) == {"seed", "model.name", "optim.name", "optim.lr",
                                       "trainer.epochs", "name"}  # fmt: skip


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}}) == {"a.b": 1, "a.c.d": [1, 2],
                                                                    "e": {}}  # fmt: skip


def test_sort_and_filter_on_a_mixed_folder(mixed: Path):
    rows = list(csv.DictReader(io.StringIO(ls(str(mixed), "--fmt=csv", "--sort=-best_val_acc"))))
    # Sorted within each table: the sweep's jobs, then the single runs; no value comes last.
    assert [r["best_val_acc"] for r in rows] == ["0.8", "0.6", "0.5", "0.3", "0.2", "", ""]
    rows = list(csv.DictReader(io.StringIO(ls(str(mixed), "--fmt=csv", "--sort=seed"))))
    assert [r["seed"] for r in rows] == ["0", "42", "123", "7", "8", "9", ""]

    def paths(*filters: str) -> list[str]:
        out = io.StringIO()
        list_runs([mixed], filters=filters, fmt="csv", out=out)
        return sorted(Path(r["path"]).name for r in csv.DictReader(io.StringIO(out.getvalue())))

    assert paths("status=failed,crashed") == ["a-failed", "c-crashed"]
    assert paths("optim.lr=0.05") == ["a-failed"]  # a config key, compared as a number
    assert paths("optim.lr=0.001", "status=completed") == ["0", "1", "2"]
    assert paths("seed=42") == ["1"]
    assert paths("status=damaged") == ["d-damaged"]
    assert paths("probes=rwc") == ["b-interrupted"]  # one of the run's probes
    assert paths("seed=42", "status=failed") == []


def test_columns_choose_what_is_shown(mixed: Path):
    header = ls(str(mixed / "a-failed"), "--fmt=csv", "--columns=status,optim.lr").splitlines()
    assert header == ["status,optim.lr", "failed,0.05"]
    # Exactly the columns asked for, named as asked; a CSV row's path is whole.
    sweep = mixed / "multirun" / "2026-01-01" / "12-00-00-cnn"
    lines = ls(str(sweep), "--fmt=csv", "--columns=status,path,swept").splitlines()
    assert lines[0] == "status,path,swept"
    assert lines[1] == f"completed,{sweep / '0'},seed=0"
    header = ls(str(sweep), "--fmt=csv").splitlines()[0].split(",")
    assert header == [*COLUMNS, "sweep", "swept"]


@pytest.mark.parametrize(
    "args, words",
    [
        (["--sort", "nope"], ["'nope'", "best_val_acc"]),
        (["--filter", "nope=1"], ["'nope'", "optim.lr"]),
        (["--filter", "status"], ["'status'", "KEY=VALUE"]),
        (["--format", "xml"], ["'xml'", "table, csv, json"]),
        (["--columns", "status,nope"], ["'nope'", "steps"]),
    ],
)
def test_bad_arguments_are_one_line_exit_2(mixed: Path, capsys, args, words):
    code = cli(["ls", str(mixed), *args])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1
    assert all(w in captured.err for w in words), captured.err


def test_sweep_summary(mixed: Path):
    sweep = mixed / "multirun" / "2026-01-01" / "12-00-00-cnn"
    out = io.StringIO()
    sweep_summary(sweep, out=out)
    text = out.getvalue()
    assert f"sweep {sweep}: 3 jobs, 3 completed" in text
    for seed in (0, 42, 123):
        assert f"seed={seed}" in text
    assert text.count("mean ± std over 3 runs") == 1
    assert text.strip().splitlines()[-1] == f"next: netprobe plot {sweep}"


def test_a_swept_line_names_only_the_overrides_a_job_was_given(tmp_path: Path):
    """Jobs of one sweep folder given different keys: each line lists its own, never `key=`."""
    from netprobe.listing import swept_overrides

    sweep = tmp_path / "sweep"
    runs = [
        fake_run(sweep / "0", 0, ["seed=0", "init=zeros"]),
        fake_run(sweep / "1", 1, ["seed=1", "optim.lr=0.1"]),
    ]
    assert list(swept_overrides(runs).values()) == ["init=zeros seed=0", "optim.lr=0.1 seed=1"]


def test_a_sweep_resent_with_resume_still_varies_only_its_seed(tmp_path: Path):
    """Sent again with trainer.resume=true, a sweep's resumed (or newly started) jobs have that
    override and the jobs it left as they were do not: bookkeeping, not what the sweep varied, so
    the jobs stay one group for mean ± std."""
    from netprobe.listing import Row, mean_std_lines, swept_overrides

    sweep = tmp_path / "sweep"
    runs = [fake_run(sweep / "0", 0, ["seed=0"], best=0.5),
            fake_run(sweep / "1", 1, ["seed=1", "trainer.resume=True"], best=0.6),
            fake_run(sweep / "2", 2, ["seed=2", "+trainer.resume=true", "trainer.log_every=5"],
                     best=0.7)]  # fmt: skip
    swept = swept_overrides(runs)
    assert list(swept.values()) == ["seed=0", "seed=1", "seed=2"]
    lines = mean_std_lines([Row(d, sweep, swept[d]) for d in runs])
    assert len(lines) == 1 and lines[0].startswith("mean ± std over 3 runs"), lines


def test_a_killed_runs_reason_gives_its_last_recorded_accuracy(tiny_run):
    """Its `val_acc` column stays empty (no final value, and none in a sweep's mean); the reason
    says how far it got."""
    run = crash(tiny_run("trainer.epochs=2").path)
    last = run.results().values["val_acc"]
    text = ls(str(run.path), "--fmt=csv", "--columns=status,reason,val_acc")
    row = next(csv.DictReader(io.StringIO(text)))
    assert row["status"] == "crashed" and row["val_acc"] == ""
    assert row["reason"].endswith(f"; last val_acc {last:.4f} (epoch 2)")
    listed = json.loads(ls(str(run.path), "--fmt=json"))
    assert listed[0]["reason"] == row["reason"]


@pytest.mark.parametrize("name", ["x[bold]y", "a[/b]"])
def test_a_sweep_summary_prints_its_folder_as_it_is(tmp_path: Path, name: str):
    """A folder named with brackets is no markup, nor a reason that holds them: printed whole,
    and no MarkupError after the sweep has run."""
    sweep = tmp_path / name
    fake_run(sweep / "0", 0, ["seed=0"])
    error = "probes=[gradients] (the run's) vs [gradients,weights]"
    fake_run(sweep / "1", 1, ["seed=1"], status="failed", error=error)
    out = io.StringIO()
    sweep_summary(sweep, out=out)
    assert out.getvalue().startswith(f"sweep {sweep}: 2 jobs, 1 completed, 1 failed\n")
    assert "[gradients,weights]" in out.getvalue()
