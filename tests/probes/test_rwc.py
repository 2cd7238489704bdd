"""rwc against numpy from saved weights, and the acceptance test: weights and rwc of a real run
re-derived from its checkpoints."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from netprobe.checkpoint import checkpoint_path, load_checkpoint
from netprobe.errors import ConfigError
from netprobe.probes import PROBES, ProbeRunner
from netprobe.probes.base import ProbeContext, StepState
from netprobe.probes.rwc import RelativeWeightChange
from netprobe.probes.weights import METRICS as WEIGHT_METRICS
from netprobe.recorder import Recorder
from netprobe.structure import layer_table


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4)
    )


def make_probe(model: nn.Module, **cfg) -> RelativeWeightChange:
    state = StepState()
    ctx = ProbeContext(
        model=model,
        layers=layer_table(model, torch.zeros(2, 2, 4, 4)),
        edges=[],
        record=Recorder(state),
        loss_fn=F.cross_entropy,
    )
    probe = PROBES["rwc"](ctx, **cfg)
    probe.runner = ProbeRunner([probe], state)  # calls its hooks as the monitor's does
    return probe


def snapshot(probe: RelativeWeightChange) -> dict[str, np.ndarray]:
    return {n: p.detach().numpy().copy() for n, p in probe.params}


def reference(w: np.ndarray, w_prev: np.ndarray, mode: str) -> float:
    """SPEC §5 rwc in float64 numpy, from two saved weight tensors."""
    x, x_prev = w.astype(np.float64).ravel(), w_prev.astype(np.float64).ravel()
    if mode == "l1":
        return np.abs(x - x_prev).sum() / np.abs(x_prev).sum()
    nonzero = x_prev != 0
    return float(np.mean(np.abs(x - x_prev)[nonzero] / np.abs(x_prev[nonzero])))


def train_steps(model: nn.Module, steps: int, seed: int) -> None:
    """Stand-in for training: a few random updates, some weights set exactly to zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(steps):
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        w = model[0].weight.view(-1)
        w[seed % 5 :: 7] = 0.0


def run_epochs(probe: RelativeWeightChange, epochs: int, steps: int = 4) -> list[dict]:
    """start, then `epochs` epochs of `steps` steps each; the weights at start and each epoch."""
    model = probe.ctx.model
    progress = probe.runner.state
    probe.runner.start()
    snaps = [snapshot(probe)]
    for epoch in range(epochs):
        for _ in range(steps):
            train_steps(model, 1, seed=100 * epoch + progress.step)
            probe.runner.after_step()
        probe.runner.end_epoch()
        snaps.append(snapshot(probe))
    return snaps


def recorded(probe: RelativeWeightChange) -> pd.DataFrame:
    df = probe.ctx.record.drain()["scalars"].to_pandas()
    return df.astype({"probe": str, "layer": str, "metric": str})


def test_registered_with_its_keys() -> None:
    assert PROBES["rwc"] is RelativeWeightChange
    assert {o.name for o in RelativeWeightChange.options} == {"mode", "every_steps"}


@pytest.mark.parametrize("mode", ["l1", "elementwise"])
def test_rwc_matches_numpy_from_saved_weights(mode: str) -> None:
    probe = make_probe(small_model(), mode=mode)
    # Default: every parameter of ndim > 1; biases and BatchNorm's vectors are left out.
    assert probe.names == ["0.weight", "4.weight"]
    snaps = run_epochs(probe, epochs=3)
    df = recorded(probe)
    assert set(df["metric"]) == {"rwc"}
    assert sorted(df["epoch"].unique()) == [0, 1, 2]
    assert sorted(df["step"].unique()) == [4, 8, 12]
    for epoch in range(3):
        for name in probe.names:
            got = df[(df["epoch"] == epoch) & (df["layer"] == name)]["value"]
            want = reference(snaps[epoch + 1][name], snaps[epoch][name], mode)
            assert len(got) == 1
            assert got.iloc[0] == pytest.approx(want, rel=1e-5, abs=0.0), (epoch, name)
    # Zeros in W_{e−1} are skipped by `elementwise` and counted by `l1`: the modes differ.
    assert (snaps[1]["0.weight"] == 0).any()


def test_every_steps_adds_a_record_against_the_weights_k_steps_before() -> None:
    probe = make_probe(small_model(), every_steps=3)
    model, progress = probe.ctx.model, probe.runner.state
    probe.runner.start()
    history = [snapshot(probe)]  # history[t] = weights before step t
    for _epoch in range(2):
        for _ in range(4):
            train_steps(model, 1, seed=progress.step)
            probe.runner.after_step()
            history.append(snapshot(probe))
        probe.runner.end_epoch()
    df = recorded(probe)
    steps = df[df["metric"] == "rwc_step"]
    # Recorded in the after_step of steps 2 and 5 (the 3rd and 6th), tagged with that step.
    assert sorted(steps["step"].unique()) == [2, 5]
    for step in (2, 5):
        for name in probe.names:
            got = steps[(steps["step"] == step) & (steps["layer"] == name)]["value"].iloc[0]
            want = reference(history[step + 1][name], history[step - 2][name], "l1")
            assert got == pytest.approx(want, rel=1e-5, abs=0.0)
    epochs = df[df["metric"] == "rwc"]
    for epoch, (a, b) in enumerate([(0, 4), (4, 8)]):
        got = epochs[(epochs["epoch"] == epoch) & (epochs["layer"] == "4.weight")]["value"]
        assert got.iloc[0] == pytest.approx(
            reference(history[b]["4.weight"], history[a]["4.weight"], "l1"), rel=1e-5
        )


def test_holds_exactly_one_copy_of_the_previous_weights(held_bytes) -> None:
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    state = StepState()
    ctx = ProbeContext(model, layer_table(model), [], Recorder(state), F.cross_entropy)
    probe = RelativeWeightChange(ctx)
    probe.runner = ProbeRunner([probe], state)
    probe.runner.start()
    for _ in range(3):
        train_steps(model, 1, seed=1)
        state.step += 1
        probe.runner.end_epoch()
        assert held_bytes(probe, model) == sorted([4 * 64 * 32, 4 * 32 * 16])


def test_layer_regexes_select_and_a_pattern_without_match_fails() -> None:
    probe = make_probe(small_model(), layers=[r"\d\.weight"], exclude=[r"0\..*"])
    assert probe.names == ["1.weight", "4.weight"]
    with pytest.raises(ConfigError, match="matches nothing"):
        make_probe(small_model(), layers=[r"classifier\..*"])


def test_resumed_probe_continues_identically() -> None:
    probe = make_probe(small_model(), every_steps=2)
    run_epochs(probe, epochs=3)
    want = recorded(probe)

    # Stop after epoch 1 with a state_dict, restart from the same weights, continue.
    first = make_probe(small_model(), every_steps=2)
    run_epochs(first, epochs=2)
    state = first.state_dict()
    saved = {k: v.clone() for k, v in first.ctx.model.state_dict().items()}
    model = small_model()
    model.load_state_dict(saved)
    resumed = make_probe(model, every_steps=2)
    resumed.runner.start()
    resumed.load_state_dict(state)
    progress = resumed.runner.state
    progress.step, progress.epoch = 8, 2
    for _ in range(4):
        train_steps(model, 1, seed=100 * 2 + progress.step)
        resumed.runner.after_step()
    resumed.runner.end_epoch()
    got = recorded(resumed)
    tail = want[want["epoch"] == 2].reset_index(drop=True)
    pd.testing.assert_frame_equal(got, tail)
    with pytest.raises(ConfigError, match="tracks"):
        make_probe(small_model(), layers=[r"0\.weight"]).load_state_dict(state)


@pytest.mark.parametrize("mode", ["l1", "elementwise"])
def test_records_read_nothing_on_the_host(no_host_sync, mode: str) -> None:
    probe = make_probe(small_model(), mode=mode, every_steps=1)
    with no_host_sync():
        probe.runner.start()
        with torch.no_grad():
            for p in probe.tensors:
                p.add_(0.1)
        probe.runner.after_step()
        probe.runner.end_epoch()
    assert len(recorded(probe)) == 2 * len(probe.names)


@pytest.mark.parametrize(
    "key, value",
    [("mode", "l2"), ("every_steps", 0), ("every_steps", "epoch"), ("every", 10)],
)
def test_bad_options_are_config_errors(key: str, value) -> None:
    with pytest.raises(ConfigError, match=key):
        make_probe(small_model(), **{key: value})


# ------------------------------------------------------------------ acceptance (issue 3)


def test_stored_rwc_and_weights_rederived_from_checkpoints(tiny_run) -> None:
    """A real run: every stored rwc value, weight statistic and histogram count follows, in numpy
    alone, from checkpoints/start.pt (before the first step) and epoch-NNNN.pt (after epoch N)."""
    run = tiny_run("model=cnn", "probes=[weights,rwc]", "trainer.checkpoint_every=1")
    epochs = run.info["epochs_done"]
    assert epochs == 2
    states = [load_checkpoint(checkpoint_path(run.path, "start"))]
    states += [load_checkpoint(checkpoint_path(run.path, e)) for e in range(epochs)]
    weights = [{k: v.numpy().astype(np.float64) for k, v in s["model"].items()} for s in states]
    steps = [s["step"] for s in states]
    assert steps[0] == 0 and steps[1] > 0

    rwc = run.scalars("rwc", "rwc")
    layers = run.layers()
    matrices = [
        f"{m}.{p}"
        for m, p, shape in zip(layers["module"], layers["param"], layers["shape"])
        if p and len(shape) > 1
    ]
    assert list(rwc.loc[rwc["epoch"] == 0, "layer"]) == matrices  # forward order
    assert len(rwc) == epochs * len(matrices)
    for e in range(epochs):
        for name in matrices:
            new, old = weights[e + 1][name], weights[e][name]
            want = np.abs(new - old).sum() / np.abs(old).sum()
            got = rwc[(rwc["epoch"] == e) & (rwc["layer"] == name)]["value"].iloc[0]
            assert got == pytest.approx(want, rel=1e-5, abs=0.0), (e, name)

    stats = run.scalars("weights")
    hists = run.histograms("weights")
    tracked = sorted(hists["layer"].unique())
    conv_linear = [n for n in matrices if n.endswith("weight")]
    assert tracked == sorted(conv_linear)
    assert sorted(stats["step"].unique()) == steps
    for name in tracked:
        w0 = weights[0][name].ravel()
        peak = 2 * np.abs(w0).max()
        for step, state in zip(steps, weights):
            x = state[name].ravel()
            h = hists[(hists["step"] == step) & (hists["layer"] == name)].iloc[0]
            edges = np.asarray(h["edges"])
            np.testing.assert_allclose(edges, np.linspace(-peak, peak, 51), rtol=1e-12)
            counts, _ = np.histogram(x, edges)
            np.testing.assert_array_equal(h["counts"], counts)
            assert h["below"] == (x < edges[0]).sum() and h["above"] == (x > edges[-1]).sum()
            mean = x.mean()
            std = np.sqrt(((x - mean) ** 2).mean())
            want = {
                "mean": mean,
                "std": std,
                "skew": ((x - mean) ** 3).mean() / std**3,
                "min": x.min(),
                "max": x.max(),
                "l2": np.sqrt((x**2).sum()),
                "dist_init": np.sqrt(((x - w0) ** 2).sum()) / np.sqrt((w0**2).sum()),
            }
            rows = stats[(stats["step"] == step) & (stats["layer"] == name)]
            got = dict(zip(rows["metric"], rows["value"]))
            assert set(got) == set(WEIGHT_METRICS)
            for metric, value in want.items():
                assert got[metric] == pytest.approx(value, rel=1e-5, abs=1e-12), (
                    step,
                    name,
                    metric,
                )
