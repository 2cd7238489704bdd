"""The gradients probe against a naive per-tensor computation."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import netprobe
from netprobe.native import step as native_step
from netprobe.probes.gradients import gradient_stats
from tests.helpers import fused_grad_stats


@pytest.fixture(autouse=True)
def both_paths(kernel_path: str) -> str:
    """Every test here runs on the fused CPU kernels and on PyTorch's."""
    return kernel_path


def per_tensor_stats(grads: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The probe's reduction on the path the test runs on."""
    kernels = native_step.kernels(grads)
    if kernels is None:
        return gradient_stats(grads)
    per_tensor, total = fused_grad_stats(kernels, grads)
    return torch.from_numpy(per_tensor), torch.tensor(total, dtype=torch.float64)


def naive_stats(g: np.ndarray) -> dict[str, float]:
    flat = [float(v) for v in g.reshape(-1)]
    l1 = sum(abs(v) for v in flat)
    return {
        "l1": l1,
        "l2": sum(v * v for v in flat) ** 0.5,
        "mean_abs": l1 / len(flat),
        "max_abs": max(abs(v) for v in flat),
        "nonfinite": sum(not math.isfinite(v) for v in flat),
    }


def rel_err(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def test_gradient_stats_match_naive_loop():
    torch.manual_seed(0)
    grads = [torch.randn(7, 5), torch.randn(3, 2, 3, 3) * 1e-3, torch.randn(11)]
    per_tensor, total = per_tensor_stats(grads)
    for row, g in zip(per_tensor, grads):
        ref = naive_stats(g.double().numpy())
        for value, metric in zip(row.tolist(), ["l1", "l2", "mean_abs", "max_abs"]):
            assert rel_err(value, ref[metric]) <= 1e-6, metric
    ref_total = sum(naive_stats(g.double().numpy())["l2"] ** 2 for g in grads) ** 0.5
    assert rel_err(float(total), ref_total) <= 1e-6


def test_stored_gradients_match_naive_loop(tmp_path):
    """Through the library API: every stored value equals the naive stats of that step's .grad."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen: list[dict[str, dict[str, float]]] = []
    with netprobe.attach(model, tmp_path, probes=["gradients"], probe_batch=(x, y)) as mon:
        for _ in range(3):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            mon.after_backward(loss)
            seen.append(
                {n: naive_stats(p.grad.double().numpy()) for n, p in model.named_parameters()}
            )
            opt.step()
            mon.after_step()
        mon.end_epoch()

    df = netprobe.load(tmp_path).scalars(probe="gradients")
    tracked = {"0.weight", "3.weight"}  # default: conv and linear weights only
    assert set(df["layer"]) - {""} == tracked
    for row in df[df["layer"] != ""].itertuples():
        assert rel_err(row.value, seen[row.step][row.layer][row.metric]) <= 1e-6
    totals = df[df["metric"] == "grad_l2_total"].set_index("step")["value"]
    for step, stats in enumerate(seen):
        ref = sum(s["l2"] ** 2 for s in stats.values()) ** 0.5  # model-wide: biases too
        assert rel_err(totals[step], ref) <= 1e-6


def test_layers_regex_selects(tiny_run):
    run = tiny_run("model=cnn", "probes.gradients.layers=[classifier\\..*weight]")
    layers = set(run.scalars(probe="gradients")["layer"]) - {""}
    assert layers == {"classifier.1.weight", "classifier.3.weight"}


def test_nonfinite_counts_bad_entries_per_tensor():
    torch.manual_seed(2)
    grads = [torch.randn(4, 5), torch.randn(2, 3, 3, 3), torch.randn(6)]
    grads[0][1, 2] = float("nan")
    grads[0][3, 0] = float("inf")
    grads[1].view(-1)[::5] = float("-inf")
    per_tensor, _ = per_tensor_stats(grads)
    for row, g in zip(per_tensor, grads):
        assert row[4].item() == naive_stats(g.double().numpy())["nonfinite"]
    assert [row[4].item() for row in per_tensor] == [2, 11, 0]
