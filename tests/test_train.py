"""The training loop: seeded reproducibility, stopping rules, and the composed config."""

import pandas as pd
import pytest
import torch

from netprobe.config import compose
from netprobe.errors import ConfigError


def curves(run) -> pd.DataFrame:
    df = pd.concat([run.scalars(probe="train"), run.scalars(probe="gradients")])
    return df[df["metric"] != "samples_per_s"].reset_index(drop=True)  # wall-clock dependent


def test_same_seed_gives_identical_scalars(tiny_run):
    a, b = tiny_run("model=cnn", "seed=7"), tiny_run("model=cnn", "seed=7")
    pd.testing.assert_frame_equal(curves(a), curves(b))
    c = tiny_run("model=cnn", "seed=8")
    assert not curves(a)["value"].equals(curves(c)["value"])


def test_max_steps_stops_mid_epoch(tiny_run):
    run = tiny_run("trainer.max_steps=3", "trainer.epochs=5")
    assert run.info["steps_done"] == 3 and run.info["epochs_done"] == 1
    assert run.scalars(probe="train", metric="loss")["step"].tolist() == [0, 1, 2]
    assert "max_steps" in run.info["stop_reason"]


def test_target_val_acc_stops_early(tiny_run):
    run = tiny_run("trainer.target_val_acc=0.01", "trainer.epochs=5")
    assert run.info["epochs_done"] == 1 and run.info["status"] == "completed"
    assert run.info["best_val_acc"] >= 0.01


def test_probes_none_still_records_training_curves(tiny_run):
    run = tiny_run("probes=none")
    assert run.info["probes"] == []
    assert run.scalars(probe="gradients").empty
    assert not run.scalars(probe="train", metric="val_acc").empty


def test_a_disabled_probe_records_nothing(tiny_run):
    run = tiny_run("probes=[gradients,rwc]", "probes.rwc.enabled=false", "trainer.max_steps=2")
    assert run.info["probes"] == ["gradients"]
    assert run.scalars(probe="rwc").empty
    assert not run.scalars(probe="gradients").empty


@pytest.mark.parametrize(
    "override, words",
    [
        ("model=nope", ["'nope'", "mlp", "cnn"]),
        ("trainer.epochs=abc", ["trainer.epochs", "'abc'", "positive integer"]),
        ("trainer.epochs=0", ["trainer.epochs", "positive integer"]),
        ("optim.lr=-1", ["optim.lr", "positive"]),
        ("trainer.bogus=1", ["trainer.bogus", "epochs"]),
        ("init=nope", ["'nope'", "kaiming_normal"]),
    ],
)
def test_bad_config_names_value_and_choices(override, words):
    with pytest.raises(ConfigError) as exc:
        compose([override])
    message = str(exc.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_every_nonlinearity_is_one_torch_takes():
    """init.nonlinearity's choices are those torch.nn.init.calculate_gain accepts."""
    from torch.nn.init import calculate_gain

    from netprobe.config import NONLINEARITIES

    for name in NONLINEARITIES:
        calculate_gain(name)
        compose(["init=kaiming_uniform", f"init.nonlinearity={name}"])


@pytest.mark.parametrize("init", ["default", "kaiming_normal", "kaiming_uniform", "xavier_normal",
                                  "xavier_uniform", "orthogonal", "ones", "zeros"])  # fmt: skip
def test_every_initializer_builds(init):
    from netprobe.init import initialize
    from netprobe.models import build_model

    cfg = compose([f"init={init}", "model=cnn", "data=synthetic", "data.image_size=8"])
    model = build_model(cfg.model)
    initialize(model, cfg.init)
    conv = model.features[0]
    if init == "zeros":
        assert conv.weight.abs().sum() == 0
    if init == "ones":
        assert (conv.weight == 1).all()
    if init != "default":
        assert conv.bias.abs().sum() == 0


def test_checkpoints_hold_the_model_after_each_epoch(tiny_run) -> None:
    from netprobe.checkpoint import load_checkpoint

    run = tiny_run("model=cnn", "probes=none", "trainer.checkpoint_every=1")
    folder = run.path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [
        "epoch-0000.pt",
        "epoch-0001.pt",
        "last.pt",
        "start.pt",
    ]
    last, final = load_checkpoint(folder / "last.pt"), load_checkpoint(folder / "epoch-0001.pt")
    assert last["epoch"] == final["epoch"] == 1
    assert last["step"] == run.info["steps_done"]
    assert {"model", "optimizer", "rng", "scheduler", "scaler"} <= set(last)
    start = load_checkpoint(folder / "start.pt")
    assert start["step"] == 0
    assert not all(
        torch.equal(start["model"][k], final["model"][k]) for k in final["model"] if "weight" in k
    )


@pytest.mark.parametrize("cut", [0.5, 0.0])
def test_a_damaged_checkpoint_is_named_in_one_whole_line(tmp_path, cut) -> None:
    """torch's message for a truncated file runs on with advice; the line keeps its first
    sentence whole, never cut mid-word."""
    from netprobe.checkpoint import load_checkpoint

    path = tmp_path / "last.pt"
    torch.save({"model": {"w": torch.zeros(1000)}, "epoch": 0, "step": 0}, path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(ConfigError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path} is damaged and cannot be read (")
    reason = message.removeprefix(f"{path} is damaged and cannot be read (").removesuffix(")")
    with pytest.raises(Exception) as raw:
        torch.load(path, weights_only=False)
    whole = str(raw.value)
    # The reason ends where a sentence of torch's ends, or where its message does.
    rest = whole[len(reason) :]
    assert reason and whole.startswith(reason) and rest in ("", ".") or rest.startswith(". ")
