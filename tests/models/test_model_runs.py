"""`netprobe train model=M` on 32x32 colour images trains every model through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from netprobe.cli import main as cli
from netprobe.config import options

MODELS = [m for m in options("model") if m != "custom"]
# Seconds each on 2 CPU cores at 32x32: kept out of the default run.
HEAVY = {"resnet18", "vgg19", "xception"}


def test_every_model_is_covered():
    assert set(MODELS) == {"alexnet", "cnn", "mlp", "resnet18", "vgg19", "xception"}


@pytest.mark.parametrize(
    "model", [pytest.param(m, marks=pytest.mark.slow) if m in HEAVY else m for m in MODELS]
)
def test_cli_trains_each_model_on_32x32_rgb(model: str, tmp_path: Path):
    run_dir = tmp_path / "run"
    args = [
        "train",
        f"model={model}",
        "data=synthetic",
        "data.image_size=32",
        "data.channels=3",
        "data.num_samples=40",
        "data.batch_size=8",
        "data.probe_size=8",
        "trainer.max_steps=2",
        f"hydra.run.dir={run_dir}",
    ]
    assert cli(args) == 0
    info = json.loads((run_dir / "run.json").read_text())
    assert (info["status"], info["model"], info["steps_done"]) == ("completed", model, 2)
