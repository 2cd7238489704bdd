"""weights probe against numpy: np.histogram with the stored edges, moments in float64."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from netprobe.errors import ConfigError
from netprobe.probes import PROBES, ProbeRunner, Schedule
from netprobe.probes.base import ProbeContext, StepState
from netprobe.probes.weights import METRICS, Weights
from netprobe.recorder import Recorder
from netprobe.structure import layer_table


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))


def make_probe(model: nn.Module, **cfg) -> Weights:
    state = StepState()
    ctx = ProbeContext(
        model=model,
        layers=layer_table(model, torch.zeros(2, model[0].in_features)),
        edges=[],
        record=Recorder(state),
        loss_fn=F.cross_entropy,
    )
    probe = PROBES["weights"](ctx, **cfg)
    probe.runner = ProbeRunner([probe], state)  # calls its hooks as the monitor's does
    return probe


def next_epoch(probe: Weights, steps: int = 3) -> None:
    probe.runner.state.step += steps
    probe.runner.end_epoch()


def tables(probe: Weights) -> tuple[pd.DataFrame, pd.DataFrame]:
    out = probe.ctx.record.drain()
    scalars = out["scalars"].to_pandas().astype({"layer": str, "metric": str, "probe": str})
    hists = out["histograms"].to_pandas().astype({"layer": str, "source": str, "probe": str})
    return scalars, hists


def reference(w: np.ndarray, w0: np.ndarray, edges: np.ndarray) -> dict:
    """SPEC §5 weights, in float64 numpy: moments, dist_init, and np.histogram counts."""
    x, x0 = w.astype(np.float64).ravel(), w0.astype(np.float64).ravel()
    mean = x.sum() / x.size
    d = x - mean
    std = np.sqrt((d**2).mean())
    skew = (d**3).mean() / std**3 if std > 0 else 0.0
    counts, _ = np.histogram(x, edges)
    norm0 = np.sqrt((x0**2).sum())
    return {
        "mean": mean,
        "std": std,
        "skew": skew,
        "min": x.min(),
        "max": x.max(),
        "l2": np.sqrt((x**2).sum()),
        # Undefined (NaN) when W₀ = 0, as for zero-initialised biases.
        "dist_init": np.sqrt(((x - x0) ** 2).sum()) / norm0 if norm0 > 0 else np.nan,
        "counts": counts,
        "below": int((x < edges[0]).sum()),
        "above": int((x > edges[-1]).sum()),
    }


def perturb(model: nn.Module, scale: float, seed: int) -> None:
    """Stand-in for training: weights drift and spread, some beyond the fixed range."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + scale).add_(scale * torch.randn(p.shape, generator=gen))


def check_against_reference(probe: Weights, snapshots: list[dict], initial: dict) -> pd.DataFrame:
    scalars, hists = tables(probe)
    steps = sorted(scalars["step"].unique())
    assert len(steps) == len(snapshots)
    first_edges = {}
    for step, weights in zip(steps, snapshots):
        for name in probe.names:
            h = hists[(hists["step"] == step) & (hists["layer"] == name)]
            assert len(h) == 1
            edges = np.asarray(h["edges"].iloc[0])
            first_edges.setdefault(name, edges)
            # Fixed for the whole run: ±2·max|W₀| from the first capture, 50 bins.
            np.testing.assert_array_equal(edges, first_edges[name])
            peak = 2 * np.abs(initial[name].astype(np.float64)).max()
            np.testing.assert_allclose(edges, np.linspace(-peak, peak, 51), rtol=1e-12)
            ref = reference(weights[name], initial[name], edges)
            np.testing.assert_array_equal(h["counts"].iloc[0], ref["counts"])
            assert (h["below"].iloc[0], h["above"].iloc[0]) == (ref["below"], ref["above"])
            rows = scalars[(scalars["step"] == step) & (scalars["layer"] == name)]
            got = dict(zip(rows["metric"], rows["value"]))
            assert set(got) == set(METRICS)
            for metric in METRICS:
                assert got[metric] == pytest.approx(ref[metric], rel=1e-5, abs=1e-12), (
                    step,
                    name,
                    metric,
                )
    return hists


def snapshot(probe: Weights) -> dict[str, np.ndarray]:
    return {n: p.detach().numpy().copy() for n, p in probe.params}


def test_registered_with_its_keys() -> None:
    assert PROBES["weights"] is Weights
    assert {o.name for o in Weights.options} == {"params", "bins"}
    assert Weights.default_schedule == Schedule(at=("start", "epoch"))


def test_every_metric_matches_numpy_over_captures() -> None:
    model = small_model()
    probe = make_probe(model)
    assert probe.names == ["0.weight", "3.weight"]  # default: conv and linear weights
    initial = snapshot(probe)
    probe.runner.start()
    snaps = [snapshot(probe)]
    for epoch in range(3):
        perturb(model, 0.4 * (epoch + 1), seed=epoch)
        snaps.append(snapshot(probe))
        next_epoch(probe)
    # Nothing the probe keeps or records is tied to the autograd graph of the parameters.
    assert not probe.edges.requires_grad and not probe.initial_norm.requires_grad
    hists = check_against_reference(probe, snaps, initial)
    # The perturbations push values out of the fixed range: the tails are really exercised.
    assert hists["below"].sum() > 0 and hists["above"].sum() > 0


@pytest.mark.parametrize("params", ["weights", "all"])
def test_out_of_range_counts_and_values_on_edges(params: str) -> None:
    model = nn.Sequential(nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.5, -0.25, 0.0, 0.1], [0.2, -0.3, 0.4, -0.5]]))
        model[0].bias.copy_(torch.tensor([0.25, -1.0]))
    probe = make_probe(model, bins=4, params=params)  # edges -1, -0.5, 0, 0.5, 1: exact in fp32
    probe.runner.start()
    values = [[-1.5, -1.0, -0.5, 0.0], [0.5, 1.0, 1.0000001, float("nan")]]
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(values))
    next_epoch(probe)
    _, hists = tables(probe)
    last = hists[(hists["step"] == 3) & (hists["layer"] == "0.weight")].iloc[0]
    np.testing.assert_array_equal(last["edges"], [-1.0, -0.5, 0.0, 0.5, 1.0])
    finite = np.array(values, np.float32).ravel()
    finite = finite[np.isfinite(finite)].astype(np.float64)
    want, _ = np.histogram(finite, last["edges"])
    np.testing.assert_array_equal(last["counts"], want)  # [-1, -.5): 1, ..., [.5, 1]: 2
    np.testing.assert_array_equal(last["counts"], [1, 1, 1, 2])
    assert (last["below"], last["above"]) == (1, 1)  # -1.5 below, 1.0000001 above; NaN nowhere


def test_params_all_adds_biases_and_norm_parameters() -> None:
    model = small_model()
    probe = make_probe(model, params="all")
    assert probe.names == [
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
        "3.weight",
        "3.bias",
    ]
    with torch.no_grad():
        model[1].weight.add_(torch.linspace(-0.2, 0.3, 5))  # BatchNorm's ones, made uneven
    initial = snapshot(probe)
    probe.runner.start()
    snaps = [snapshot(probe)]
    perturb(model, 0.1, seed=5)
    snaps.append(snapshot(probe))
    next_epoch(probe)
    scalars, hists = tables(probe)
    sources = dict(zip(hists["layer"], hists["source"]))
    assert sources == {n: ("bias" if n.endswith("bias") else "weight") for n in probe.names}
    check_against_reference_tables(probe, scalars, hists, snaps, initial)


def check_against_reference_tables(probe, scalars, hists, snaps, initial) -> None:
    # Every capture, every tensor and every metric must be there: a loop over the rows that
    # happen to exist would pass on a probe that records nothing.
    steps = sorted(scalars["step"].unique())
    assert len(steps) == len(snaps)
    assert sorted(hists["step"].unique()) == steps
    for step, weights in zip(steps, snaps):
        for name in probe.names:
            h = hists[(hists["step"] == step) & (hists["layer"] == name)]
            assert len(h) == 1, (step, name)
            h = h.iloc[0]
            ref = reference(weights[name], initial[name], np.asarray(h["edges"]))
            np.testing.assert_array_equal(h["counts"], ref["counts"])
            assert (h["below"], h["above"]) == (ref["below"], ref["above"]), (step, name)
            rows = scalars[(scalars["step"] == step) & (scalars["layer"] == name)]
            assert sorted(rows["metric"]) == sorted(ref.keys() - {"counts", "below", "above"})
            for metric, value in zip(rows["metric"], rows["value"]):
                want = pytest.approx(ref[metric], rel=1e-5, abs=1e-12, nan_ok=True)
                assert value == want, (name, metric)


def test_zero_initial_tensor_has_no_relative_distance() -> None:
    model = small_model()
    with torch.no_grad():
        model[0].bias.zero_()
    probe = make_probe(model, layers=[r"0\.bias"])
    probe.runner.start()
    with torch.no_grad():
        model[0].bias.add_(0.1)
    next_epoch(probe)
    scalars, hists = tables(probe)
    dist = scalars[scalars["metric"] == "dist_init"].sort_values("step")["value"].to_numpy()
    assert len(dist) == 2  # recorded at the start and after the epoch, as NaN: 0/0 is undefined
    assert np.isnan(dist).all()
    # A tensor of zeros gets the bins ±1 rather than a range of width zero.
    np.testing.assert_array_equal(hists["edges"].iloc[0][[0, -1]], [-1.0, 1.0])
    assert hists.sort_values("step")["counts"].iloc[0][25] == 5
    std = scalars[(scalars["metric"] == "skew") & (scalars["step"] == 0)]["value"]
    assert (std == 0).all()  # a constant tensor has no skew


def test_initial_weights_are_those_before_the_first_step_even_without_a_start_capture() -> None:
    model = small_model()
    probe = make_probe(model, at=["epoch"])
    initial = snapshot(probe)
    probe.runner.start()
    assert "scalars" not in probe.ctx.record.drain()
    perturb(model, 0.3, seed=1)
    snaps = [snapshot(probe)]
    next_epoch(probe)
    scalars, hists = tables(probe)
    assert sorted(scalars["step"].unique()) == [3]
    check_against_reference_tables(probe, scalars, hists, snaps, initial)
    # The bins are fixed at the first capture (after epoch 0), not at W₀.
    peak = 2 * np.abs(snaps[0]["0.weight"].astype(np.float64)).max()
    assert hists[hists["layer"] == "0.weight"]["edges"].iloc[0][-1] == pytest.approx(peak)


def test_layer_regexes_select_and_a_pattern_without_match_fails() -> None:
    probe = make_probe(small_model(), layers=[r"\d\.bias"], exclude=[r"1\..*"])
    assert probe.names == ["0.bias", "3.bias"]
    with pytest.raises(ConfigError, match="matches nothing"):
        make_probe(small_model(), layers=[r"features\.0\.weight"])


def test_resumed_probe_continues_identically() -> None:
    model = small_model()
    probe = make_probe(model)
    probe.runner.start()
    perturb(model, 0.5, seed=2)
    next_epoch(probe)
    state = probe.state_dict()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    perturb(model, 0.7, seed=3)
    next_epoch(probe)
    want_scalars, want_hists = tables(probe)

    # A fresh model and probe, as after a restart from the checkpoint: its own start is ignored.
    model2 = small_model()
    model2.load_state_dict(saved)
    resumed = make_probe(model2)
    resumed.runner.start()
    resumed.ctx.record.drain()
    resumed.load_state_dict(state)
    resumed.runner.state.step, resumed.runner.state.epoch = 3, 1
    perturb(model2, 0.7, seed=3)
    next_epoch(resumed)
    got_scalars, got_hists = tables(resumed)
    last = want_scalars[want_scalars["step"] == 6].reset_index(drop=True)
    pd.testing.assert_frame_equal(got_scalars, last)
    last_h = want_hists[want_hists["step"] == 6].reset_index(drop=True)
    for column in ("layer", "below", "above"):
        assert list(got_hists[column]) == list(last_h[column])
    for a, b in zip(got_hists["counts"], last_h["counts"]):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(got_hists["edges"], last_h["edges"]):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ConfigError, match="tracks"):
        make_probe(small_model(), params="all").load_state_dict(state)


def test_capture_reads_nothing_on_the_host(no_host_sync) -> None:
    model = small_model()
    probe = make_probe(model, params="all")
    with no_host_sync():
        probe.runner.start()
        perturb(model, 0.2, seed=0)
        next_epoch(probe)
    scalars, _ = tables(probe)
    assert len(scalars) == 2 * len(probe.names) * len(METRICS)


@pytest.mark.parametrize(
    "key, value", [("params", "biases"), ("bins", 0), ("bins", 2.5), ("every", 5)]
)
def test_bad_options_are_config_errors(key: str, value) -> None:
    with pytest.raises(ConfigError, match=key):
        make_probe(small_model(), **{key: value})


def test_tensors_reduced_in_slices_give_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    from netprobe.probes import distributions

    # Slices of at most 7 elements: every tensor is reduced piece by piece.
    monkeypatch.setattr(distributions, "SLICE", 7)
    model = small_model()
    probe = make_probe(model, params="all")
    initial = snapshot(probe)
    probe.runner.start()
    snaps = [snapshot(probe)]
    perturb(model, 0.3, seed=4)
    snaps.append(snapshot(probe))
    next_epoch(probe)
    scalars, hists = tables(probe)
    check_against_reference_tables(probe, scalars, hists, snaps, initial)


def test_capture_leaves_float64_weights_untouched() -> None:
    # For float64 parameters the float64 view is the parameter itself: nothing may write to it.
    from netprobe.probes.distributions import distributions

    w = torch.randn(6, 5, dtype=torch.float64)
    before = w.clone()
    distributions([w], reference=[torch.ones_like(w)])
    assert torch.equal(w, before)


@pytest.mark.parametrize("spread", [False, True])
def test_bin_counts_match_numpy_on_edges_outside_and_nan(spread: bool) -> None:
    from netprobe.probes.distributions import bin_counts

    edges = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0], dtype=torch.float64)
    x = torch.tensor([-2.0, -1.0, -0.5, -0.1, 0.0, 0.5, 0.99, 1.0, 1.5, float("nan")] * 3)
    x = x.to(torch.float64)
    counts = bin_counts(x, edges, spread=spread).numpy()
    finite = x[~torch.isnan(x)].numpy()
    inside, _ = np.histogram(finite, edges.numpy())
    np.testing.assert_array_equal(counts[1:-1], inside)
    assert (counts[0], counts[-1]) == ((finite < -1).sum(), (finite > 1).sum())
