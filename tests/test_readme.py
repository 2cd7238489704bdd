"""The README's tables of config groups and probes say what the config files and the code do."""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import OmegaConf

from netprobe.cli import main as cli
from netprobe.config import GROUPS, conf_dir

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def table_rows(first_header: str) -> dict[str, str]:
    """The rows of the README table whose header starts with `| first_header |`, by first cell."""
    lines = README.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = cells[1]
    return rows


def test_config_groups_table_lists_every_group_and_trainer_key():
    rows = table_rows("group")
    assert set(rows) == set(GROUPS)
    trainer = OmegaConf.load(conf_dir() / "trainer" / "default.yaml")
    for key in trainer:
        assert f"`{key}`" in rows["trainer"], key


def test_probes_table_gives_each_capture_probes_schedule(capsys):
    assert cli(["probes", "probes=all"]) == 0
    listed = dict(re.split(r"\s{2,}", line)[:2] for line in capsys.readouterr().out.splitlines())
    for probe, when in table_rows("probe").items():
        if probe in listed and listed[probe].startswith("at "):
            assert "at " + when.replace("each ", "") == listed[probe], probe
