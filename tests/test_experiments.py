"""The experiment presets (SPEC §6): each composes, sets its study's setup, and runs tiny."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from netprobe.cli import main as cli
from netprobe.config import compose, conf_dir, options
from netprobe.probes.memory import split_budget
from netprobe.store import Run

PRESETS = ["rwc", "init_test", "feature_signal", "optimization_insight", "grad_analysis",
           "gradient_flow"]  # fmt: skip
PROBES = {
    "rwc": ["rwc", "weights"],
    "init_test": ["weights", "activations", "channels"],
    "feature_signal": ["correlation", "augmentation", "activations"],
    "optimization_insight": ["optim_dynamics", "gradients"],
    "grad_analysis": ["gradients", "weights"],
    "gradient_flow": ["gradient_flow", "gradients"],
}


def has_probes(preset: str) -> bool:
    """Whether conf/probes/ holds every probe config the preset selects (they land separately)."""
    return all(p in options("probes") for p in PROBES[preset])


def needs_probes(preset: str) -> None:
    if not has_probes(preset):
        missing = [p for p in PROBES[preset] if p not in options("probes")]
        pytest.skip(f"conf/probes/ lacks {', '.join(missing)} for experiment={preset}")


def keep_probes_if(preset: str) -> list[str]:
    """The preset's own probes where their configs exist, else gradients in their place, so the
    rest of the preset is exercised before the probe configs land."""
    if has_probes(preset):
        return []
    # init_test's body sets probes.weights.params, which would bring `weights` back.
    return ["probes=[gradients]"] + (["~probes.weights"] if preset == "init_test" else [])


def preset_defaults(preset: str) -> dict[str, object]:
    """The `override /group: option` entries of a preset's defaults list."""
    text = (conf_dir() / "experiment" / f"{preset}.yaml").read_text()
    entries = yaml.safe_load(text)["defaults"]
    assert text.startswith("# @package _global_")
    return {k.removeprefix("override /"): v for e in entries for k, v in e.items()}


def test_every_preset_is_listed():
    assert options("experiment") == sorted(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_selects_its_probes(preset: str):
    assert preset_defaults(preset)["probes"] == PROBES[preset]


EXPECTED = {
    "rwc": {
        "model.name": "alexnet",
        "data.name": "cifar10",
        "optim.name": "sgd",
        "optim.lr": 0.001,
        "optim.momentum": 0.9,
        "optim.weight_decay": 1e-4,
        "data.batch_size": 128,
        "trainer.epochs": 150,
        "trainer.target_val_acc": 0.94,
    },
    "init_test": {
        "model.name": "cnn",
        "data.name": "cifar10",
        "init.name": "kaiming_normal",
        "optim.name": "adam",
        "optim.lr": 1e-4,
        "data.batch_size": 64,
        "trainer.epochs": 50,
    },
    "feature_signal": {"model.name": "mlp", "data.name": "mnist"},
    "optimization_insight": {"model.name": "cnn", "data.name": "cifar10"},
    "grad_analysis": {"model.name": "resnet18"},
    "gradient_flow": {"model.name": "mlp"},
}


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_sets_its_study_setup(preset: str):
    cfg = compose([f"experiment={preset}", *keep_probes_if(preset)])
    for key, value in EXPECTED[preset].items():
        assert (
            OmegaConf.select(cfg, key) == pytest.approx(value)
            if isinstance(value, float)
            else OmegaConf.select(cfg, key) == value
        ), key


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_with_its_probes(preset: str):
    needs_probes(preset)
    cfg = compose([f"experiment={preset}"])
    assert sorted(split_budget(cfg.probes)[0]) == sorted(PROBES[preset])
    if preset == "init_test":
        assert cfg.probes.weights.params == "all"


@pytest.mark.parametrize("after", [True, False], ids=["after", "before"])
def test_command_line_wins_over_the_preset(after: bool):
    ours = ["model=vgg19", "data=mnist", "optim.lr=0.1", "data.batch_size=32", "seed=42"]
    args = ["experiment=rwc", *ours] if after else [*ours, "experiment=rwc"]
    cfg = compose([*args, *keep_probes_if("rwc")])
    assert (cfg.model.name, cfg.data.name, cfg.optim.lr) == ("vgg19", "mnist", 0.1)
    assert (cfg.data.batch_size, cfg.seed) == (32, 42)
    assert cfg.optim.momentum == 0.9 and cfg.trainer.epochs == 150  # the rest of the preset stays
    assert cfg.data.num_classes == 10 and cfg.model.in_channels == 1


def hydra_section(preset: str) -> dict:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            cfg = hydra_compose(
                "config",
                [f"experiment={preset}", *keep_probes_if(preset)],
                return_hydra_config=True,
            )
    finally:
        GlobalHydra.instance().clear()
    return OmegaConf.to_container(cfg.hydra.sweeper.params)


def test_rwc_sweeps_five_seeds_and_init_test_seven_initializers():
    assert hydra_section("rwc") == {"seed": "0,42,123,1000,1234"}
    swept = hydra_section("init_test")["init"].split(",")
    assert sorted(swept) == sorted(o for o in options("init") if o != "default")


@pytest.mark.parametrize("preset", PRESETS)
def test_cfg_job_prints_the_composed_preset(preset: str, capsys: pytest.CaptureFixture):
    # No data files are needed just to print the config.
    assert cli(["train", f"experiment={preset}", *keep_probes_if(preset), "--cfg", "job"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["name"] == EXPECTED[preset]["model.name"]


@pytest.mark.parametrize(
    "preset",
    # ResNet-18 takes seconds even at 8x8 on 2 CPU cores; the other presets' models are light.
    [pytest.param(p, marks=pytest.mark.slow) if p == "grad_analysis" else p for p in PRESETS],
)
def test_preset_runs_tiny(preset: str, tiny_run: Callable[..., Run]):
    small = ["data.num_samples=64", "data.batch_size=16", "data.probe_size=16"]
    run = tiny_run(f"experiment={preset}", *keep_probes_if(preset), *small, "trainer.max_steps=2")
    assert run.info["status"] == "completed" and run.info["steps_done"] == 2
    assert run.info["data"] == "synthetic" and run.info["model"] == EXPECTED[preset]["model.name"]
    if has_probes(preset):
        assert sorted(run.info["probes"]) == sorted(PROBES[preset])


def test_multirun_sweeps_the_rwc_seeds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    args = [
        "train",
        "-m",
        "experiment=rwc",
        *keep_probes_if("rwc"),
        "model=mlp",  # the sweep is what is tested here; AlexNet would only add time
        "data=synthetic",
        "data.num_samples=64",
        "data.image_size=8",
        "data.probe_size=16",
        "data.batch_size=16",
        "trainer.max_steps=1",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    assert cli(args) == 0
    seeds = [json.loads(p.read_text())["seed"] for p in (tmp_path / "sweep").glob("*/run.json")]
    assert sorted(seeds) == [0, 42, 123, 1000, 1234]
