"""optim_dynamics against a naive per-element reference on a hand-made sequence of steps."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import netprobe
from netprobe.errors import ConfigError
from netprobe.probes import PROBES, ProbeRunner
from netprobe.probes.base import ProbeContext, StepState
from netprobe.probes.optim_dynamics import METRICS, UNPAIRED_METRICS, OptimDynamics, sign_codes
from netprobe.recorder import Recorder
from netprobe.structure import layer_table

ZERO, TINY = 1e-5, 1e-7


@pytest.fixture(autouse=True)
def both_paths(kernel_path: str) -> str:
    """Every test here runs on the fused CPU kernels (their tensors checked by tensors.cpp and
    in Python) and on PyTorch's: "fused" or "torch"."""
    return "torch" if kernel_path == "torch" else "fused"


TRACKED = [r"0\.weight", r"2\.weight", r"2\.bias"]

# Tensor 0.weight (6 entries), step by step; each column is one entry's story:
# e0 zero → zero → released; e1 tiny, flips while retained, stays; e2 flips twice while retained;
# e3 large → zero (not released: it was not zero) → retained at exactly 0; e4 large flips (counts
# only in flip_frac_all); e5 retained, then flips while retained.
G0 = [
    [0.0, 5e-8, -3e-6, 2e-5, -1e-2, 4e-6],
    [0.0, -6e-8, 2e-6, 3e-6, -2e-2, 5e-6],
    [1e-3, -7e-8, -8e-6, 0.0, 3e-2, -9e-6],
    [-2e-3, 9e-8, 4e-6, 0.0, -4e-2, 6e-6],
    [5e-6, -1e-8, -2e-6, 7e-6, 5e-2, -3e-6],
]
# 0.weight before step 0 (first row) and after each step: updates of both signs, and a zero update.
W0 = [
    [0.10, -0.20, 0.30, 0.40, -0.50, 0.60],
    [0.11, -0.20, 0.29, 0.41, -0.49, 0.59],
    [0.12, -0.21, 0.30, 0.41, -0.50, 0.60],
    [0.10, -0.22, 0.31, 0.40, -0.48, 0.58],
    [0.10, -0.20, 0.30, 0.42, -0.51, 0.61],
    [0.09, -0.19, 0.31, 0.42, -0.52, 0.60],
]
MAGNITUDES = [0.0, 3e-8, 6e-8, 2e-6, 7e-6, 3e-5, 4e-3]


def hand_made(steps: int = 5) -> tuple[list[list[np.ndarray]], list[list[np.ndarray]]]:
    """Gradients G[t][i] and weights W[t][i] (W[0] before step 0, W[t+1] after step t), float32.

    The first tensor is written out above; the other two mix magnitudes around both thresholds
    with random signs, so zeros, releases, retains and flips all occur.
    """
    rng = np.random.default_rng(7)
    shapes = [(2, 3), (5, 2), (5,)]
    grads = [[np.array(G0[t], np.float32).reshape(shapes[0])] for t in range(steps)]
    weights = [[np.array(W0[t], np.float32).reshape(shapes[0])] for t in range(steps + 1)]
    for shape in shapes[1:]:
        for t in range(steps):
            mag = rng.choice(MAGNITUDES, size=shape)
            grads[t].append((mag * rng.choice([-1.0, 1.0], size=shape)).astype(np.float32))
        w = rng.normal(size=shape)
        for t in range(steps + 1):
            weights[t].append(w.astype(np.float32))
            w = w + rng.choice([0.0, -1e-2, 2e-3, 5e-2], size=shape)
    return grads, weights


def naive_reference(grads, weights, zero=ZERO, tiny=TINY) -> dict[tuple[int, int, str], float]:
    """SPEC §5 optim_dynamics, one element at a time in float64: {(step, tensor, metric): value}."""
    out = {}
    for t in range(len(grads)):
        for i in range(len(grads[t])):
            g = [float(x) for x in grads[t][i].ravel()]
            w_before = [float(x) for x in weights[t][i].ravel()]
            w_after = [float(x) for x in weights[t + 1][i].ravel()]
            n = len(g)
            dw = [w_after[j] - w_before[j] for j in range(n)]
            out[t, i, "zero_frac_1e7"] = sum(1 for x in g if abs(x) <= tiny) / n
            out[t, i, "zero_frac"] = sum(1 for x in g if abs(x) <= zero) / n
            out[t, i, "wdiff_l2"] = math.sqrt(sum(d * d for d in dw))
            if t == 0:
                continue
            gp = [float(x) for x in grads[t - 1][i].ravel()]
            n_prev = released = retained = flip_ret = flip_all = local_min = local_max = 0
            moved = 0.0
            for j in range(n):
                z_prev, z_now = abs(gp[j]) <= zero, abs(g[j]) <= zero
                flip = gp[j] * g[j] < 0
                n_prev += z_prev
                released += z_prev and not z_now
                flip_all += flip
                if z_prev and z_now:
                    retained += 1
                    moved += abs(dw[j])
                    if flip:
                        flip_ret += 1
                        curvature = dw[j] * (g[j] - gp[j])
                        local_min += curvature > 0
                        local_max += curvature < 0
            out[t, i, "released_frac"] = released / max(n_prev, 1)
            out[t, i, "retained_frac"] = retained / max(n_prev, 1)
            out[t, i, "flip_frac"] = flip_ret / max(retained, 1)
            out[t, i, "flip_frac_all"] = flip_all / n
            out[t, i, "wdiff_retained"] = moved / max(retained, 1)
            out[t, i, "local_min"] = float(local_min)
            out[t, i, "local_max"] = float(local_max)
    return out


def small_model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 5))


LOSS = torch.zeros(())  # what the runner is told of each step's loss


def make_probe(model: nn.Module, seed: int = 0, **cfg) -> OptimDynamics:
    """The probe, started by a runner as the monitor's (`probe.runner`)."""
    state = StepState()
    ctx = ProbeContext(
        model=model,
        layers=layer_table(model),
        edges=[],
        record=Recorder(state),
        loss_fn=F.cross_entropy,
        seed=seed,
    )
    probe = PROBES["optim_dynamics"](ctx, **cfg)
    probe.runner = ProbeRunner([probe], state)
    probe.runner.start()
    return probe


def feed(probe: OptimDynamics, grads, weights, between=None, loop=None, before=None) -> None:
    """Drive the probe as the training loop would: backward, step, next step; `before(t)` as
    step t's gradients are set and `between(t)` after step t, before the next one, when given.
    `loop` takes the loop's two calls: the probe's runner, or a monitor it is attached to."""
    params, loop = probe.tensors, loop or probe.runner
    with torch.no_grad():
        for p, w in zip(params, weights[0]):
            p.copy_(torch.from_numpy(w))
    for t in range(len(grads)):
        for p, g in zip(params, grads[t]):
            p.grad = torch.from_numpy(g.copy())
        if before is not None:
            before(t)
        loop.after_backward(LOSS)
        with torch.no_grad():
            for p, w in zip(params, weights[t + 1]):
                p.copy_(torch.from_numpy(w))
        loop.after_step()
        if between is not None:
            between(t)


def recorded(probe: OptimDynamics) -> pd.DataFrame:
    df = probe.ctx.record.drain()["scalars"].to_pandas()
    return df.astype({"probe": str, "layer": str, "metric": str})


def test_registered_with_its_config_keys() -> None:
    assert PROBES["optim_dynamics"] is OptimDynamics
    assert {o.name for o in OptimDynamics.options} == {
        "zero_threshold",
        "tiny_threshold",
        "sign_samples",
        "sign_rows",
    }


def test_every_metric_matches_the_naive_reference() -> None:
    grads, weights = hand_made()
    probe = make_probe(small_model(), layers=TRACKED)
    assert probe.names == ["0.weight", "2.weight", "2.bias"]
    feed(probe, grads, weights)
    df = recorded(probe)
    ref = naive_reference(grads, weights)
    # The first step has no previous gradient: only what is defined there is recorded.
    assert set(df.loc[df["step"] == 0, "metric"]) == set(UNPAIRED_METRICS)
    for t in range(1, len(grads)):
        assert set(df.loc[df["step"] == t, "metric"]) == set(METRICS)
    assert len(df) == 3 * len(UNPAIRED_METRICS) + 3 * len(METRICS) * (len(grads) - 1)
    got = {
        (int(s), probe.names.index(layer), m): v
        for s, layer, m, v in zip(df["step"], df["layer"], df["metric"], df["value"])
    }
    assert got.keys() == ref.keys()
    for key, want in ref.items():
        assert got[key] == pytest.approx(want, rel=1e-5, abs=0.0), key
    # The hand-made tensor exercises each case at least once.
    for metric in ("released_frac", "flip_frac", "wdiff_retained", "local_min", "local_max"):
        assert any(ref[t, 0, metric] > 0 for t in range(1, len(grads))), metric


def test_through_a_monitor_every_metric_matches_the_naive_reference(tmp_path) -> None:
    """Attached to a monitor (beside the monitor's own read of every gradient, which makes
    per-tensor rows for `gradients`), with a step where an untracked parameter has no gradient:
    the stored records are the naive reference's."""
    grads, weights = hand_made()
    model = small_model()
    probes = {"optim_dynamics": {"layers": TRACKED}, "gradients": {}}

    def bias_grad(t: int) -> None:
        model[0].bias.grad = None if t == 2 else torch.full((2,), 0.5)

    with netprobe.attach(model, tmp_path, probes=probes) as mon:
        probe = next(p for p in mon.probes if p.name == "optim_dynamics")
        feed(probe, grads, weights, loop=mon, before=bias_grad)
    df = netprobe.load(tmp_path).scalars(probe="optim_dynamics")
    names = ["0.weight", "2.weight", "2.bias"]
    got = {
        (int(s), names.index(layer), m): v
        for s, layer, m, v in zip(df["step"], df["layer"], df["metric"], df["value"])
    }
    ref = naive_reference(grads, weights)
    assert got.keys() == ref.keys()
    for key, want in ref.items():
        assert got[key] == pytest.approx(want, rel=1e-5, abs=0.0), key


def test_configurable_thresholds() -> None:
    grads, weights = hand_made()
    probe = make_probe(small_model(), layers=TRACKED, zero_threshold=5e-4, tiny_threshold=1e-6)
    feed(probe, grads, weights)
    df = recorded(probe)
    ref = naive_reference(grads, weights, zero=5e-4, tiny=1e-6)
    for s, layer, m, v in zip(df["step"], df["layer"], df["metric"], df["value"]):
        assert v == pytest.approx(ref[int(s), probe.names.index(layer), m], rel=1e-5, abs=0.0)


def test_every_two_steps_still_compares_with_the_step_before() -> None:
    grads, weights = hand_made()
    probe = make_probe(small_model(), layers=TRACKED, every=2)
    feed(probe, grads, weights)
    df = recorded(probe)
    assert sorted(df["step"].unique()) == [0, 2, 4]
    ref = naive_reference(grads, weights)
    for s, layer, m, v in zip(df["step"], df["layer"], df["metric"], df["value"]):
        assert v == pytest.approx(ref[int(s), probe.names.index(layer), m], rel=1e-5, abs=0.0)
    assert set(df.loc[df["step"] == 2, "metric"]) == set(METRICS)


def test_flat_buffers_are_allocated_once(held_bytes, both_paths: str) -> None:
    """The fused path holds one code byte per tracked element and W_{t−1}, and a pool of host
    blocks per kind of record (256 of [2 tensors, 3 or 10 metrics] in float64, the second from
    the first compared step); PyTorch's path six float32 buffers of the tracked size (g_t and
    z_t of this step and the step before, retained, W_{t−1}); made once and reused, never a
    per-step allocation."""
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    probe = make_probe(model)
    n = 64 * 64 + 64 * 32
    torch.manual_seed(0)
    storages = None
    for step in range(4):
        for p in probe.tensors:
            p.grad = torch.randn_like(p) * 1e-5
        probe.runner.after_backward(LOSS)
        with torch.no_grad():
            for p in probe.tensors:
                p.add_(torch.randn_like(p) * 1e-3)
        probe.runner.after_step()
        held = held_bytes(probe, model)
        pools = [256 * 2 * 3 * 8, *([256 * 2 * 10 * 8] if step else [])]
        big = sorted([n, 4 * n, *pools]) if both_paths == "fused" else [4 * n] * 6
        assert [b for b in held if b >= n] == big
        assert sum(b for b in held if b < n) < 8192  # per-tensor counts, the sign sample (index)
        state = probe._state
        buffers = [state.codes, state.w_prev] if both_paths == "fused" else state.b.values()
        assert (probe._kernels is not None) == (both_paths == "fused")
        now = {t.untyped_storage().data_ptr() for t in buffers}
        assert storages is None or now == storages
        storages = now


def test_nan_gradients_count_as_neither_zero_nor_flipped() -> None:
    grads, weights = hand_made(3)
    for t in (1, 2):
        grads[t][0] = grads[t][0].copy()
        grads[t][0].flat[[0, 3]] = np.nan
    probe = make_probe(small_model(), layers=TRACKED)
    feed(probe, grads, weights)
    df = recorded(probe)
    ref = naive_reference(grads, weights)
    for s, layer, m, v in zip(df["step"], df["layer"], df["metric"], df["value"]):
        assert v == pytest.approx(ref[int(s), probe.names.index(layer), m], rel=1e-5, abs=0.0)


def test_sign_map_codes_of_the_sampled_entries() -> None:
    model = nn.Sequential(nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 3))
    probe = make_probe(model, seed=3, sign_samples=16)
    torch.manual_seed(1)
    values = torch.tensor([0.0, 3e-6, -4e-6, 1e-5 / 2, -2e-5, 2e-5, 0.3, -1e-9])
    grads = [values[torch.randint(len(values), p.shape)] for p in probe.tensors]
    for p, g in zip(probe.tensors, grads):
        p.grad = g.clone()
    probe.runner.after_backward(LOSS)
    probe.runner.after_step()
    probe.runner.end_epoch()
    df = probe.ctx.record.drain()["matrices"].to_pandas().astype({"name": str, "row": str})
    assert list(df["name"].unique()) == ["sign_steps", "sign_map"]
    np.testing.assert_array_equal(df.loc[df["name"] == "sign_steps", "values"].iloc[0], [0])
    df = df[df["name"] == "sign_map"]
    assert list(df["row"]) == probe.names
    assert all(list(shape) == [1, 16] for shape in df["shape"])
    flat = torch.cat([g.reshape(-1) for g in grads]).double().numpy()
    index = probe.sign_index.numpy()
    # 16 of the 200 entries, 16 of the 30 (fewer entries than K would keep them all); distinct.
    assert probe.sign_sizes == [16, 16]
    for (a, b), layer_values, offset, size in zip(
        [(0, 16), (16, 32)], df["values"], [0, 200], [200, 30]
    ):
        picks = index[a:b]
        assert len(set(picks)) == 16 and (picks >= offset).all() and (picks < offset + size).all()
        want = []
        for g in flat[picks]:
            small = -ZERO <= g <= ZERO
            want.append(2.0 if not small else 1.0 if g > 0 else -1.0 if g < 0 else 0.0)
        np.testing.assert_array_equal(layer_values, want)
    # Every code occurs among these values: exact zeros, small ±, large.
    codes = np.concatenate(df["values"].to_list())
    assert set(np.unique(codes)) == {-1.0, 0.0, 1.0, 2.0}
    # Drawn once from the run seed: the same seed draws the same entries, another seed others.
    np.testing.assert_array_equal(make_probe(model, seed=3, sign_samples=16).sign_index, index)
    assert not np.array_equal(make_probe(model, seed=4, sign_samples=16).sign_index, index)
    small = make_probe(model, seed=3, sign_samples=64)
    assert small.sign_sizes == [64, 30]


def test_sign_codes_at_the_threshold() -> None:
    """Small means |g| ≤ threshold, the threshold itself included; non-finite gradients are NaN."""
    t = 2.0**-16  # exact in float32 and float64
    g = torch.tensor([t, -t, 2 * t, -2 * t, 0.0, -0.0, float("nan"), float("inf")])
    np.testing.assert_array_equal(sign_codes(g, t).numpy(), [1, -1, 2, 2, 0, 0, np.nan, np.nan])


def test_sign_map_keeps_evenly_spaced_steps_of_each_epoch() -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    probe = make_probe(model, sign_samples=4, sign_rows=5)
    steps = []
    for _epoch in range(2):
        for _ in range(23):
            for p in probe.tensors:
                p.grad = torch.full_like(p, float(probe.runner.state.step))
            probe.runner.after_backward(LOSS)
            probe.runner.after_step()
        probe.runner.end_epoch()
        df = probe.ctx.record.drain()["matrices"].to_pandas().astype({"name": str})
        got = df.loc[df["name"] == "sign_steps", "values"].iloc[0]
        sign = df[df["name"] == "sign_map"]
        assert list(sign["shape"].iloc[0]) == [len(got), 4]
        steps.append(got)
    # At most 5 rows per epoch, spread over the whole epoch, first and last step included.
    first = np.asarray(steps[0])
    assert len(first) == 5 and first[0] == 0 and first[-1] >= 20
    assert np.asarray(steps[1])[0] == 23 and len(steps[1]) == 5
    assert np.all(np.diff(first) > 0)


def test_sign_map_waits_for_a_gradient() -> None:
    probe = make_probe(small_model())
    probe.runner.end_epoch()
    assert "matrices" not in probe.ctx.record.drain()


def test_per_step_path_never_reads_device_values(no_host_sync) -> None:
    grads, weights = hand_made()
    probe = make_probe(small_model(), layers=TRACKED)
    params = probe.tensors
    for t in range(3):
        for p, g in zip(params, grads[t]):
            p.grad = torch.from_numpy(g.copy())
        with no_host_sync():
            probe.runner.after_backward(LOSS)
        with torch.no_grad():
            for p, w in zip(params, weights[t + 1]):
                p.copy_(torch.from_numpy(w))
        with no_host_sync():
            probe.runner.after_step()
    assert len(recorded(probe)) == 3 * len(UNPAIRED_METRICS) + 2 * 3 * len(METRICS)


@pytest.mark.parametrize(
    "key, value",
    [
        ("zero_threshold", -1.0),
        ("tiny_threshold", "small"),
        ("sign_samples", 0),
        ("sign_rows", 0),
        ("every", "epoch"),
    ],
)
def test_bad_options_are_config_errors(key: str, value) -> None:
    with pytest.raises(ConfigError, match=key):
        make_probe(small_model(), **{key: value})


def test_a_weight_change_between_steps_is_not_counted_as_an_update() -> None:
    """W_{t−1} is the weights step t starts from, even when something outside the optimizer
    changed them in place after the step before (a projection, a pruning mask)."""
    grads, weights = hand_made()
    shift = [np.full_like(w, 0.25) for w in weights[0]]
    probe = make_probe(small_model(), layers=TRACKED)
    starts = [weights[0]]

    def shift_weights(t: int) -> None:
        with torch.no_grad():
            for p, s in zip(probe.tensors, shift):
                p.add_(torch.from_numpy(s))
        starts.append([w + s for w, s in zip(weights[t + 1], shift)])

    feed(probe, grads, weights, between=shift_weights)
    df = recorded(probe)
    wdiff = df[df["metric"] == "wdiff_l2"]
    for s, layer, v in zip(wdiff["step"], wdiff["layer"], wdiff["value"]):
        i = probe.names.index(layer)
        want = np.linalg.norm(weights[int(s) + 1][i].astype(np.float64) - starts[int(s)][i])
        assert v == pytest.approx(want, rel=1e-5), (s, layer)
