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
