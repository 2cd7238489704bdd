"""Bad input to `netprobe train`, `plot` and `ls`: exit 2, one line naming the bad value and what
would be valid, no traceback, and nothing written."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from netprobe.cli import main as cli
from netprobe.errors import ConfigError
from netprobe.probes import PROBES

TINY = ["data=synthetic", "data.num_samples=128", "data.image_size=8", "data.probe_size=32"]

TRAIN_CASES = {
    # unknown option in a config group
    "model": (["model=nope"], ["'nope'", "mlp", "resnet18"]),
    "data": (["data=nope"], ["'nope'", "digits", "cifar10"]),
    "init": (["init=nope"], ["'nope'", "orthogonal"]),
    "optim": (["optim=nope"], ["'nope'", "sgd", "adamw"]),
    "probes": (["probes=[nope]"], ["'nope'", "gradients"]),
    "trainer": (["trainer=nope"], ["'nope'", "default"]),
    "experiment": (["experiment=nope"], ["'nope'", "rwc"]),
    # unknown config key
    "trainer key": (["trainer.bogus=1"], ["trainer.bogus", "epochs", "on_nonfinite"]),
    # optimizer recipes (conf/optim): what hydra.utils.instantiate would refuse, refused before
    "added optim key": (["+optim.bogus=1"], ["optim cannot be built", "'bogus'", "lr, betas"]),
    "optim target": (["optim._target_=torch.optim.Nope"], ["optim", "'torch.optim.Nope'"]),
    "optim target keys": (
        ["optim=adam", "optim._target_=torch.optim.SGD"],
        ["'betas'", "torch.optim.SGD takes", "momentum"],
    ),
    "top key": (["bogus=1"], ["'bogus'", "seed"]),
    "probe key": (["probes.gradients.bogus=1"], ["probes.gradients.bogus", "every", "layers"]),
    "added probe key": (["+probes.gradients.bogus=1"], ["'bogus'", "gradients", "layers"]),
    "unselected probe's key": (
        ["probes.rwc.enabled=false"],
        [
            "'probes.rwc.enabled'",
            "rwc is not among this run's probes (gradients)",
            "probes=[gradients,rwc]",
        ],
    ),  # fmt: skip
    # wrong type
    "epochs type": (["trainer.epochs=abc"], ["trainer.epochs", "'abc'", "positive integer"]),
    "lr type": (["optim.lr=abc"], ["optim.lr", "'abc'", "positive number"]),
    "batch type": (["data.batch_size=1.5"], ["data.batch_size=1.5", "positive integer"]),
    "on_nonfinite": (["trainer.on_nonfinite=maybe"], ["'maybe'", "stop or continue"]),
    # a switch given a word or a number: 'maybe' would resume, compile or not as Python reads it
    "resume type": (["trainer.resume=maybe"], ["trainer.resume='maybe'", "true or false"]),
    "compile type": (["trainer.compile=1"], ["trainer.compile=1", "true or false"]),
    "deterministic type": (["trainer.deterministic=yes"], ["trainer.deterministic='yes'"]),
    # out of range
    "epochs 0": (["trainer.epochs=0"], ["trainer.epochs=0", "positive integer"]),
    "epochs <0": (["trainer.epochs=-2"], ["trainer.epochs=-2", "positive integer"]),
    "lr 0": (["optim.lr=0"], ["optim.lr=0", "positive number"]),
    "lr <0": (["optim=sgd", "optim.lr=-0.1"], ["optim.lr=-0.1", "positive number"]),
    "batch 0": (["data.batch_size=0"], ["data.batch_size=0", "positive integer"]),
    "zero_threshold": (
        ["probes=[optim_dynamics]", "probes.optim_dynamics.zero_threshold=-1"],
        ["probes.optim_dynamics.zero_threshold=-1", "≥ 0"],
    ),
    "tiny_threshold": (
        ["probes=[optim_dynamics]", "probes.optim_dynamics.tiny_threshold=-1e-9"],
        ["probes.optim_dynamics.tiny_threshold=-1e-09", "≥ 0"],
    ),
    "flow threshold": (
        ["probes=[gradient_flow]", "probes.gradient_flow.threshold=-0.5"],
        ["probes.gradient_flow.threshold=-0.5", "≥ 0"],
    ),
    "every 0": (["probes.gradients.every=0"], ["probes.gradients.every=0", "positive"]),
    "flow every": (
        ["probes=[gradient_flow]", "probes.gradient_flow.every=-3"],
        ["probes.gradient_flow.every=-3", "positive"],
    ),
    "every type": (["probes.gradients.every=often"], ["'often'", "positive", "'epoch'"]),
    "custom model": (
        ["model=custom", "model._target_=torch.nn.Linear"],
        ["model=custom", "cannot build", "in_channels"],
    ),
    "weights bins": (
        ["probes=[weights]", "probes.weights.bins=0"],
        ["probes.weights.bins=0", "positive integer"],
    ),
    "activations tail": (
        ["probes=[activations]", "probes.activations.tail=0.2"],
        ["probes.activations.tail=0.2", "[0, 0.005)"],
    ),
    "rwc mode": (["probes=[rwc]", "probes.rwc.mode=nope"], ["'nope'", "elementwise"]),
    # out of the domain of what takes them
    "init gain": (["init=xavier_normal", "init.gain=-1"], ["init.gain=-1", "a number ≥ 0"]),
    "init nonlinearity": (
        ["init=kaiming_normal", "init.nonlinearity=foo"],
        ["init.nonlinearity='foo'", "relu, leaky_relu", "conv2d"],
    ),
    "device": (["trainer.device=cuda:99"], ["trainer.device=cuda:99", "does not exist", "cpu"]),
    "betas": (["optim.betas=[2,3]"], ["optim.betas=[2, 3]", "two numbers in [0, 1)"]),
    "momentum": (["optim=sgd", "optim.momentum=-1"], ["optim.momentum=-1", "[0, 1)"]),
    "nesterov": (
        ["optim=sgd", "optim.nesterov=true", "optim.momentum=0"],
        ["optim.nesterov=true", "optim.momentum > 0"],
    ),
    "scheduler": (["optim.scheduler=bogus"], ["optim.scheduler='bogus'", "cosine or step"]),
    "step_size": (["optim.scheduler=step", "optim.step_size=0"], ["optim.step_size=0"]),
    "lr inf": (["optim.lr=inf"], ["optim.lr=inf", "positive number"]),
    "image_size 0": (["data.image_size=0"], ["data.image_size=0", "positive integer"]),
    "channels 0": (["data.channels=0"], ["data.channels=0", "positive integer"]),
    "width <0": (["model=cnn", "model.width=-4"], ["model.width=-4", "positive integer"]),
    "seed range": (["seed=18446744073709551616"], ["seed=18446744073709551616", "64-bit"]),
    "seed type": (["seed=abc"], ["seed='abc'", "64-bit integer"]),
    "seed null": (["seed=null"], ["seed=None", "64-bit integer"]),
    "seed list": (["seed=[1,2]"], ["seed=[1, 2]", "64-bit integer"]),
    "several values": (["seed=1,2"], ["seed=1,2", "several values", "-m", "key=[a,b]"]),
    "name path": (["name=a/b"], ["name='a/b'", "a folder name", "without '/'"]),
    "max_steps range": (["trainer.max_steps=9223372036854775808"], ["trainer.max_steps"]),
    "absurd data": (
        ["data.num_samples=100000000000"],
        ["data.num_samples=100000000000", "GiB", "memory"],
    ),
    "memory budget": (
        ["probes.memory_budget=lots"],
        ["probes.memory_budget='lots'", "auto", "512MB"],
    ),
    # probe settings only the model can judge
    "capture over budget": (
        [
            "model=cnn",
            "probes=[correlation]",
            "probes.correlation.conv=flatten",
            "probes.correlation.max_features=100000",
            "probes.memory_budget=20MB",
        ],
        [
            "probes.correlation needs about",
            "MB per capture",
            "probes.memory_budget (20MB",
            "lower probes.correlation.max_features",
        ],
    ),  # fmt: skip
    "layers": (
        ["model=cnn", "probes.gradients.layers=[nope\\..*]"],
        ["probes.gradients.layers", "'nope\\\\..*'", "matches nothing", "features.0.weight"],
    ),
}


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = cli(args)
    return code, capsys.readouterr().err


def assert_one_line(code: int, err: str, words: list[str]) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_bad_train_input_is_one_line_and_writes_nothing(case, tmp_path, monkeypatch, capsys):
    overrides, words = TRAIN_CASES[case]
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(["train", *TINY, *overrides], capsys)
    assert_one_line(code, err, words)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(["train", *TINY, "trainer.device=cuda"], capsys)
    assert_one_line(code, err, ["trainer.device=cuda", "no CUDA device", "auto, cpu"])
    assert list(tmp_path.iterdir()) == []


def test_missing_dataset(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(["train", "data=mnist", f"data.root={tmp_path / 'none'}"], capsys)
    assert_one_line(code, err, [f"data.root={tmp_path / 'none'}", "data.download=true"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("multirun", [False, True])
def test_output_folder_under_a_file(tmp_path, monkeypatch, capsys, multirun):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    args = ["train", *TINY, f"{key}={tmp_path / 'notes.txt' / 'run'}"]
    code, err = run_cli(args + (["-m", "seed=0,1"] if multirun else []), capsys)
    assert_one_line(code, err, [f"{key}={tmp_path / 'notes.txt' / 'run'}", "is a file", key])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_output_folder_that_cannot_be_written(tmp_path, monkeypatch, capsys):
    """What a read-only folder does (root ignores permissions, so the refusal is simulated)."""

    def refuse(*args: object, **kwargs: object) -> str:
        raise PermissionError(13, "Permission denied")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    code, err = run_cli(["train", *TINY, "out_root=/somewhere/read-only"], capsys)
    assert_one_line(code, err, ["hydra.run.dir=/somewhere/read-only/", "Permission denied"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(tmp_path, monkeypatch, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(["train", *TINY, f"hydra.run.dir={locked / 'run'}"], capsys)
    assert_one_line(code, err, [f"hydra.run.dir={locked / 'run'}", "cannot be written"])
    assert list(locked.iterdir()) == []


def test_folder_that_holds_a_finished_run_is_refused(tiny_run, tmp_path, monkeypatch, capsys):
    run = tiny_run("trainer.epochs=1", "trainer.max_steps=1", "probes=none")
    before = sorted(p.name for p in Path(run.path).rglob("*"))
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(["train", *TINY, f"hydra.run.dir={run.path}"], capsys)
    assert_one_line(code, err, [str(run.path), "already holds a run", "trainer.resume=true"])
    assert sorted(p.name for p in Path(run.path).rglob("*")) == before


def test_plot_and_ls_without_runs(tmp_path, capsys):
    for command in (["plot", str(tmp_path)], ["ls", str(tmp_path)]):
        code, err = run_cli(command, capsys)
        assert_one_line(code, err, ["no runs", str(tmp_path)])
    code, err = run_cli(["plot", str(tmp_path / "nowhere")], capsys)
    assert_one_line(code, err, ["no such file or directory", "nowhere"])
    assert list(tmp_path.iterdir()) == []


def test_plot_only_unknown_figure(tiny_run, capsys):
    run = tiny_run("trainer.epochs=1", "trainer.max_steps=1", "probes=none")
    capsys.readouterr()
    code, err = run_cli(["plot", str(run.path), "--only", "training_curves,nope"], capsys)
    assert_one_line(code, err, ["'nope'", "training_curves", "grad_norms"])
    assert not (run.path / "figures").exists()


def test_sweep_into_a_folder_holding_its_runs_is_refused(tmp_path, monkeypatch, capsys):
    sweep = tmp_path / "sweep"
    args = ["train", "-m", "seed=0,1", *TINY, "trainer.epochs=1", "trainer.max_steps=1",
            "probes=none", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    monkeypatch.chdir(tmp_path)
    assert cli(args) == 0
    config = (sweep / "1" / ".hydra" / "config.yaml").read_text()
    capsys.readouterr()
    code, err = run_cli([*args, "optim.lr=0.5"], capsys)
    assert_one_line(code, err, [str(sweep / "0"), "already holds a run"])
    assert (sweep / "1" / ".hydra" / "config.yaml").read_text() == config


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_every_probe_passes_the_check_with_its_defaults(model):
    from netprobe.checks import check_probes
    from netprobe.config import compose

    check_probes(compose([*TINY, f"model={model}", "probes=all"]))
    # The same check does look at every probe of `all`: one bad setting in any of them is refused.
    assert set(compose(["probes=all"]).probes) - {"memory_budget"} == set(PROBES)
    for probe in PROBES:
        bad = [
            *TINY,
            f"model={model}",
            "probes=all",
            f"probes.{probe}.layers=[nothing_is_called_so]",
        ]
        with pytest.raises(ConfigError, match="nothing_is_called_so"):
            check_probes(compose(bad))
