"""`netprobe ls`: the jobs of each sweep listed together, with what the sweep varied."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from rich.console import Console

from netprobe.listing import list_runs, sweep_of


def fake_run(path: Path, seed: int, overrides: list[str], status: str = "completed") -> Path:
    (path / ".hydra").mkdir(parents=True)
    info = {"status": status, "model": "cnn", "data": "digits", "init": "default", "seed": seed,
            "epochs_done": 2, "best_val_acc": 0.5}  # fmt: skip
    (path / "run.json").write_text(json.dumps(info))
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    return path


def test_ls_groups_runs_by_sweep(tmp_path: Path):
    sweep = tmp_path / "multirun" / "2026-01-01" / "12-00-00-cnn"
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    for job, seed in enumerate((0, 42, 123)):
        fake_run(sweep / str(job), seed, [f"seed={seed}", "model=cnn"], status="completed")
    single = fake_run(tmp_path / "2026-01-01" / "run", 7, ["model=cnn"], status="failed")
    assert sweep_of(sweep / "1") == sweep.resolve() and sweep_of(single) is None

    console = Console(record=True, width=200)
    tables = list_runs([tmp_path], console=console)
    text = console.export_text()
    assert [t.title for t in tables] == [f"sweep {sweep.resolve()} (3 runs)", "single runs"]
    assert text.index("sweep ") < text.index("seed=42") < text.index("single runs")
    assert "model=cnn" not in text  # the same in every job: not what the sweep varied
    assert tables[0].row_count == 3 and tables[1].row_count == 1
    assert "failed" in text and str(single) in text


def test_ls_of_plain_runs_is_one_table(tmp_path: Path):
    fake_run(tmp_path / "a", 0, [])
    fake_run(tmp_path / "b", 1, [])
    console = Console(record=True, width=200)
    tables = list_runs([tmp_path], console=console)
    assert len(tables) == 1 and tables[0].title is None and tables[0].row_count == 2
