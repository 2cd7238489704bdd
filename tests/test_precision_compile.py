"""`trainer.precision=bf16` and `trainer.compile=true` work with every probe (probes=all)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

TABLES = ("scalars", "histograms", "matrices")


def records(run) -> dict[str, set[tuple]]:
    """What each table holds, by key: which (step, probe, layer, metric) etc. were recorded."""
    keys = {
        "scalars": ["step", "probe", "layer", "metric"],
        "histograms": ["step", "probe", "layer", "source"],
        "matrices": ["step", "probe", "name", "row", "col"],
    }
    out = {}
    for table in TABLES:
        df = getattr(run, table)()
        if table == "scalars":
            df = df[df["metric"] != "samples_per_s"]
        out[table] = set(map(tuple, df[keys[table]].itertuples(index=False)))
    return out


def merged(a, b, probe: str) -> pd.DataFrame:
    key = ["step", "layer", "metric"]
    return a.scalars(probe=probe).merge(b.scalars(probe=probe), on=key, suffixes=("_a", "_b"))


@pytest.mark.parametrize("model", ["cnn", "mlp"])
def test_bf16_records_what_float32_records(tiny_run, model):
    full = tiny_run(f"model={model}", "probes=all", "trainer.epochs=1")
    half = tiny_run(f"model={model}", "probes=all", "trainer.epochs=1", "trainer.precision=bf16")
    assert half.info["status"] == "completed", half.info["error"]
    assert set(half.info["probes"]) == set(full.info["probes"])
    assert records(half) == records(full)
    # Statistics are taken in float32 (the parameters and their gradients stay float32 under
    # autocast): finite wherever float32's are, and close to them at step 0.
    for probe in ("gradients", "optim_dynamics", "gradient_flow", "weights"):
        both = merged(full, half, probe)
        finite = np.isfinite(both["value_a"])
        assert np.isfinite(both.loc[finite, "value_b"]).all(), probe
    first = merged(full, half, "gradients").query("step == 0 and metric == 'l2'")
    np.testing.assert_allclose(first["value_b"], first["value_a"], rtol=0.1)


@pytest.mark.slow
def test_compile_records_what_eager_records(tiny_run):
    steps = ["trainer.epochs=3", "trainer.max_steps=21"]  # gradient_flow captures 0, 10 and 20
    eager = tiny_run("model=cnn", "probes=all", *steps)
    compiled = tiny_run("model=cnn", "probes=all", *steps, "trainer.compile=true")
    assert compiled.info["status"] == "completed", compiled.info["error"]
    assert records(compiled) == records(eager)
    flow = compiled.scalars(probe="gradient_flow", metric="out_grad_l2")
    assert sorted(flow["step"].unique()) == [0, 10, 20]
    for probe in ("gradients", "gradient_flow"):
        both = merged(eager, compiled, probe).query("step == 0")
        np.testing.assert_allclose(both["value_b"], both["value_a"], rtol=1e-3, atol=1e-7)


def test_statistics_of_a_bf16_model_are_taken_in_float32(tmp_path):
    """A model cast to bf16 (library API): gradient statistics are exact sums of its bf16 values."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    import netprobe

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 512), nn.ReLU(), nn.Linear(512, 10))
    model = model.to(torch.bfloat16)
    x, y = torch.randn(32, 3, 8, 8, dtype=torch.bfloat16), torch.randint(0, 10, (32,))
    with netprobe.attach(model, tmp_path, probes=["gradients", "gradient_flow"]) as mon:
        F.cross_entropy(model(x).float(), y).backward()
        mon.after_backward(torch.zeros(()))
        grads = {n: p.grad.double() for n, p in model.named_parameters()}
        mon.after_step()
    got = netprobe.load(tmp_path).scalars(probe="gradients").set_index(["layer", "metric"])
    for name in ("1.weight", "3.weight"):
        g = grads[name]
        for metric, want in (
            ("l1", g.abs().sum()),
            ("l2", g.square().sum().sqrt()),
            ("max_abs", g.abs().max()),
        ):
            assert got.loc[(name, metric), "value"] == pytest.approx(float(want), rel=1e-5)
    flow = netprobe.load(tmp_path).scalars(probe="gradient_flow", metric="w_grad_l2")
    w = flow.set_index("layer")["value"]
    want = (grads["1.weight"].square().sum() + grads["1.bias"].square().sum()).sqrt()
    assert w["1"] == pytest.approx(float(want), rel=1e-5)


def test_precision_16_records_the_unscaled_gradients(tmp_path):
    """Under float16 autocast with a GradScaler (scale 2¹⁶), through netprobe's own training step:
    every gradient-reading probe and the training curve's norm match a float32 autograd pass of
    the same model and batch, and optim_dynamics matches the unscaled `.grad` it was given."""
    import copy

    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    import netprobe
    from netprobe.train import train_step

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)
    )
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    # The float32 reference: ∂L/∂W and ∂L/∂y of each module with parameters, by autograd.
    ref = copy.deepcopy(model)
    outputs = {}
    for name in ("0", "3"):
        ref.get_submodule(name).register_forward_hook(
            lambda _m, _i, out, name=name: outputs.__setitem__(name, out)
        )
    loss = F.cross_entropy(ref(x), y)
    params = dict(ref.named_parameters())
    found = torch.autograd.grad(loss, [outputs["0"], outputs["3"], *params.values()])
    out_grad = {"0": found[0].norm(), "3": found[1].norm()}
    grad = dict(zip(params, found[2:]))

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    probes = {"gradients": {}, "gradient_flow": {"every": 1}, "optim_dynamics": {}}
    seen = {}
    with netprobe.attach(model, tmp_path, probes=probes, probe_batch=(x, y)) as mon:

        def autocast():
            return torch.autocast("cpu", dtype=torch.float16)

        original = mon.after_backward

        def after_backward(*args, **kwargs):
            seen.update({n: p.grad.clone() for n, p in model.named_parameters()})
            original(*args, **kwargs)

        mon.after_backward = after_backward
        train_step(model, x, y, optimizer, scaler, autocast, mon)
    run = netprobe.load(tmp_path)

    def stored(probe, metric):
        df = run.scalars(probe=probe, metric=metric).query("step == 0")
        return df.set_index("layer")["value"]

    flow = stored("gradient_flow", "out_grad_l2")
    for name, want in out_grad.items():
        assert flow[name] == pytest.approx(float(want), rel=2e-2), name
    w_flow = stored("gradient_flow", "w_grad_l2")
    for name in ("0", "3"):
        want = (grad[f"{name}.weight"].square().sum() + grad[f"{name}.bias"].square().sum()).sqrt()
        assert w_flow[name] == pytest.approx(float(want), rel=2e-2), name
    for name in ("0.weight", "3.weight"):
        for metric, want in (
            ("l1", grad[name].abs().sum()),
            ("l2", grad[name].norm()),
            ("max_abs", grad[name].abs().max()),
        ):
            assert stored("gradients", metric)[name] == pytest.approx(float(want), rel=2e-2)
        g = seen[name].double()
        assert stored("optim_dynamics", "zero_frac")[name] == pytest.approx(
            float((g.abs() <= 1e-5).double().mean()), abs=0.0
        )
    total = torch.stack([g.square().sum() for g in grad.values()]).sum().sqrt()
    assert stored("train", "grad_l2_total")[""] == pytest.approx(float(total), rel=2e-2)


def test_precision_16_run_records_what_float32_records(tiny_run):
    """`trainer.precision=16` (float16 autocast, GradScaler at 2¹⁶) with every gradient-reading
    probe, against the same run in float32. At step 0 both read the same model and batch, so the
    values agree to float16's rounding (measured ≤ 0.3 %). Later steps start from weights a few
    float16 steps apart: ‖∂L/∂y‖ stays within 4 % at every step (an unscaled value would be 65536
    times larger, whatever the scale drifts to), and channels, at the end, runs its own float32
    backward on the weights seven such steps made (within 7 %)."""
    probes = ["model=cnn", "probes=[gradients,gradient_flow,optim_dynamics,channels]",
              "probes.gradient_flow.every=1", "trainer.epochs=1"]  # fmt: skip
    full = tiny_run(*probes)
    half = tiny_run(*probes, "trainer.precision=16")
    assert half.info["status"] == "completed", half.info["error"]
    assert records(half) == records(full)

    def check(probe: str, metric: str, rel: float, steps: str = "step == 0") -> None:
        both = merged(full, half, probe).query(f"metric == '{metric}' and {steps}")
        assert len(both), (probe, metric)
        np.testing.assert_allclose(both["value_b"], both["value_a"], rtol=rel, err_msg=metric)

    first_step = [
        ("gradients", "l2"),
        ("gradients", "l1"),
        ("train", "grad_l2_total"),
        ("gradient_flow", "w_grad_l2"),
        ("optim_dynamics", "wdiff_l2"),
    ]
    for probe, metric in first_step:
        check(probe, metric, 2e-2)
    check("gradient_flow", "out_grad_l2", 2e-2)
    check("gradient_flow", "out_grad_l2", 0.1, steps="step >= 0")
    for metric in ("em_mean", "ab_mean", "em_std", "ab_std"):
        check("channels", metric, 0.15, steps="step >= 0")
