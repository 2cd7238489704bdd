"""activations probe against a reference forward written with plain functional torch, reduced in
numpy (np.histogram with the stored edges, moments in float64)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from netprobe.errors import ConfigError
from netprobe.probes import PROBES, ProbeRunner, Schedule
from netprobe.probes.activations import RANDOM_SALT, STATS, Activations
from netprobe.probes.base import ProbeContext, StepState
from netprobe.recorder import Recorder
from netprobe.structure import layer_table

SEED = 5


def small_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4)
    )
    with torch.no_grad():
        model[0].bias[0] = -100.0  # channel 0 of the conv output is ≤ 0 for every sample: dead
        model[1].running_mean.copy_(torch.tensor([0.3, -0.2, 0.1]))
        model[1].running_var.copy_(torch.tensor([0.5, 2.0, 1.5]))
        model[1].bias.copy_(torch.tensor([0.1, -0.4, 0.2]))
    return model


def batches() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    train = (torch.randn(16, 2, 4, 4, generator=gen), torch.zeros(16, dtype=torch.long))
    valid = (torch.randn(16, 2, 4, 4, generator=gen) + 0.5, torch.zeros(16, dtype=torch.long))
    return train, valid


def make_probe(model: nn.Module, with_batches: bool = True, **cfg) -> Activations:
    state = StepState()
    train, valid = batches() if with_batches else (None, None)
    ctx = ProbeContext(
        model=model,
        layers=layer_table(model, torch.zeros(2, 2, 4, 4)),
        edges=[],
        record=Recorder(state),
        loss_fn=F.cross_entropy,
        probe_batch=train,
        valid_batch=valid,
        seed=SEED,
    )
    probe = PROBES["activations"](ctx, **cfg)
    probe.runner = ProbeRunner([probe], state)  # calls its hooks as the monitor's does
    return probe


def reference_outputs(model: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """The tracked modules' outputs in eval mode, by plain functional calls, as float64 arrays."""
    conv, bn, linear = model[0], model[1], model[4]
    with torch.no_grad():
        y0 = F.conv2d(x, conv.weight, conv.bias)
        y1 = F.batch_norm(
            y0, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps
        )
        y4 = F.linear(F.relu(y1).flatten(1), linear.weight, linear.bias)
    return {"0": y0.double().numpy(), "1": y1.double().numpy(), "4": y4.double().numpy()}


def reference_stats(y: np.ndarray, edges: np.ndarray) -> dict:
    x = y.reshape(len(y), -1)
    flat = x.ravel()
    mean = flat.sum() / flat.size
    d = flat - mean
    std = np.sqrt((d**2).mean())
    counts, _ = np.histogram(flat, edges)
    dead = np.mean([all(x[b, j] <= 0 for b in range(len(x))) for j in range(x.shape[1])])
    return {
        "mean": mean,
        "std": std,
        "skew": (d**3).mean() / std**3,
        "zero_frac": (flat <= 0).sum() / flat.size,
        "dead_frac": dead,
        "counts": counts,
        "below": int((flat < edges[0]).sum()),
        "above": int((flat > edges[-1]).sum()),
    }


def reference_inputs() -> dict[str, torch.Tensor]:
    train, valid = batches()
    gen = torch.Generator().manual_seed(SEED * 1_000_003 + RANDOM_SALT)
    return {"train": train[0], "valid": valid[0], "random": torch.rand(16, 2, 4, 4, generator=gen)}


def tables(probe: Activations) -> tuple[pd.DataFrame, pd.DataFrame]:
    out = probe.ctx.record.drain()
    scalars = out["scalars"].to_pandas().astype({"layer": str, "metric": str, "probe": str})
    hists = out["histograms"].to_pandas().astype({"layer": str, "source": str, "probe": str})
    return scalars, hists


def perturb(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5).add_(0.3 * torch.randn(p.shape, generator=gen))


def test_registered_with_its_keys() -> None:
    assert PROBES["activations"] is Activations
    assert {o.name for o in Activations.options} == {"sources", "bins", "tail"}
    assert Activations.default_schedule == Schedule(at=("start", "epoch"))


def test_every_metric_matches_the_reference_over_captures(kernel_path: str) -> None:
    model = small_model()
    probe = make_probe(model)
    assert probe.names == ["0", "1", "4"]  # default: every module with parameters
    model.train()
    inputs = reference_inputs()
    outputs = [{s: reference_outputs(model, x) for s, x in inputs.items()}]
    probe.runner.start()
    for epoch in range(2):
        perturb(model, seed=epoch)
        outputs.append({s: reference_outputs(model, x) for s, x in inputs.items()})
        probe.runner.state.step += 4
        probe.runner.end_epoch()
    # Captured in eval mode and back in train mode after; no hook is left behind.
    assert model.training and all(m.training for m in model.modules())
    assert all(not m._forward_hooks for m in model.modules())

    scalars, hists = tables(probe)
    steps = sorted(scalars["step"].unique())
    assert steps == [0, 4, 8]
    assert set(scalars["metric"]) == {f"{s}/{m}" for s in inputs for m in STATS}
    assert set(hists["source"]) == set(inputs)
    for source in inputs:
        for name in probe.names:
            for step, out in zip(steps, outputs):
                y = out[source][name].ravel()
                # Each capture's own 50 bins: from its 0.1 % to its 99.9 % quantile.
                want_edges = np.linspace(*np.quantile(y, [0.001, 0.999]), 51)
                h = hists[(hists["step"] == step) & (hists["layer"] == name)]
                h = h[h["source"] == source].iloc[0]
                edges = np.asarray(h["edges"])
                np.testing.assert_allclose(edges, want_edges, rtol=1e-9, atol=1e-12)
                ref = reference_stats(out[source][name], edges)
                np.testing.assert_array_equal(h["counts"], ref["counts"])
                assert (h["below"], h["above"]) == (ref["below"], ref["above"])
                # What falls outside is the two 0.1 % tails: under 1 % of the values.
                assert h["below"] + h["above"] <= np.ceil(0.002 * y.size) + 1
                rows = scalars[(scalars["step"] == step) & (scalars["layer"] == name)]
                got = {
                    m.split("/")[1]: v
                    for m, v in zip(rows["metric"], rows["value"])
                    if m.startswith(source + "/")
                }
                assert set(got) == set(STATS)
                for metric in STATS:
                    assert got[metric] == pytest.approx(ref[metric], rel=1e-5, abs=1e-12), (
                        source,
                        step,
                        name,
                        metric,
                    )
    # The conv's dead channel is seen: 4 of its 12 units are ≤ 0 for every sample.
    dead = scalars[(scalars["layer"] == "0") & (scalars["metric"] == "train/dead_frac")]
    assert dead.sort_values("step")["value"].iloc[0] == pytest.approx(4 / 12)
    # The perturbed weights grow the later outputs: their bins grow with them.
    widths = hists.assign(width=[e[-1] - e[0] for e in hists["edges"]])
    conv = widths[(widths["layer"] == "0") & (widths["source"] == "train")]
    assert conv.sort_values("step")["width"].is_monotonic_increasing


def test_eval_mode_leaves_batchnorm_statistics_alone() -> None:
    model = small_model()
    before = {k: v.clone() for k, v in model[1].state_dict().items()}
    probe = make_probe(model)
    model.train()
    probe.runner.start()
    for k, v in model[1].state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    # A model in eval mode stays in eval mode.
    model.eval()
    probe.runner.state.step += 1
    probe.runner.end_epoch()
    assert not model.training


def test_zero_tail_spans_min_to_max_and_constant_outputs_get_a_range() -> None:
    from netprobe.probes.distributions import central_edges

    x = torch.tensor([3.0, -1.0, 7.0, float("nan"), 2.0, float("inf")])
    np.testing.assert_allclose(central_edges(x, 4, 0.0).numpy(), np.linspace(-1, 7, 5))
    np.testing.assert_allclose(
        central_edges(torch.full((9,), 2.5), 2, 0.001).numpy(), [1.5, 2.5, 3.5]
    )
    np.testing.assert_allclose(
        central_edges(torch.full((3,), torch.nan), 2, 0.0).numpy(), [-1, 0, 1]
    )
    # A large tensor: quantiles of an evenly strided subset, close to the whole one's.
    big = torch.randn(50_000, generator=torch.Generator().manual_seed(0))
    edges = central_edges(big, 10, 0.01, sample=10_000).numpy()
    np.testing.assert_allclose(edges[[0, -1]], np.quantile(big.numpy(), [0.01, 0.99]), atol=0.1)


def test_layer_regexes_select_modules_without_parameters_too(kernel_path: str) -> None:
    probe = make_probe(small_model(), layers=[r"[0-2]"], exclude=["1"], sources=["train"])
    assert probe.names == ["0", "2"]
    probe.runner.start()
    scalars, hists = tables(probe)
    assert set(hists["source"]) == {"train"}
    relu = hists[hists["layer"] == "2"].iloc[0]
    assert relu["edges"][0] == 0.0  # a ReLU output is ≥ 0: its bins start at 0
    # Its exact zeros are what zero_frac and dead_frac count (y ≤ 0, not y < 0).
    model = small_model()
    y = np.maximum(reference_outputs(model, batches()[0][0])["1"], 0.0)
    want = reference_stats(y, np.asarray(relu["edges"]))
    got = scalars[scalars["layer"] == "2"].set_index("metric")["value"]
    assert want["zero_frac"] > 0.25 and want["dead_frac"] >= 1 / 3  # channel 0 is dead
    for metric in ("zero_frac", "dead_frac", "mean", "std"):
        assert got[f"train/{metric}"] == pytest.approx(want[metric], rel=1e-6), metric
    with pytest.raises(ConfigError, match="matches nothing"):
        make_probe(small_model(), layers=[r"features\..*"])


def test_hooks_go_even_when_the_forward_fails() -> None:
    model = small_model()
    probe = make_probe(model)
    probe.ctx.probe_batch = (torch.zeros(2, 5, 4, 4), None)  # wrong channel count
    model.train()
    with pytest.raises(RuntimeError):
        probe.runner.start()
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())


def test_bins_depend_on_the_capture_alone(kernel_path: str) -> None:
    """A resumed probe (a fresh one) records the same histograms: there is no state to carry."""
    model = small_model()
    probe = make_probe(model)
    probe.runner.start()
    perturb(model, seed=0)
    probe.runner.state.step += 1
    probe.runner.end_epoch()
    _, want = tables(probe)
    state = probe.state_dict()

    resumed = make_probe(model)
    resumed.load_state_dict(state)
    resumed.runner.state.step = 1
    resumed.capture(resumed.runner.state)
    _, got = tables(resumed)
    want = want[want["step"] == 1].reset_index(drop=True)
    for column in ("layer", "source", "below", "above"):
        assert list(got[column]) == list(want[column])
    for a, b in zip(got["edges"], want["edges"]):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(got["counts"], want["counts"]):
        np.testing.assert_array_equal(a, b)


def test_capture_reads_nothing_on_the_host(no_host_sync, kernel_path: str) -> None:
    model = small_model()
    probe = make_probe(model)
    with no_host_sync():
        probe.runner.start()
        perturb(model, seed=1)
        probe.runner.state.step += 1
        probe.runner.end_epoch()
    scalars, _ = tables(probe)
    assert len(scalars) == 2 * 3 * 3 * len(STATS)


def test_needs_an_input_batch() -> None:
    with pytest.raises(ConfigError, match="probe_batch"):
        make_probe(small_model(), with_batches=False)


@pytest.mark.parametrize(
    "key, value",
    [("sources", ["test"]), ("bins", 0), ("every", 5), ("at", ["later"]), ("tail", 0.01)],
)
def test_bad_options_are_config_errors(key: str, value) -> None:
    with pytest.raises(ConfigError, match=key):
        make_probe(small_model(), **{key: value})
