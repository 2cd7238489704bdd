"""The gradients probe against a naive per-tensor computation."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import netprobe
from netprobe.native import step as native_step
from netprobe.probes.gradients import Gradients, gradient_stats, picker
from netprobe.probes.reductions import TotalNorm
from tests.helpers import fused_grad_stats, train_steps


@pytest.fixture(autouse=True)
def both_paths(kernel_path: str) -> str:
    """Every test here runs on the fused CPU kernels (their tensors checked by tensors.cpp and
    in Python) and on PyTorch's: "fused" or "torch"."""
    return "torch" if kernel_path == "torch" else "fused"


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


def train_seeing(
    mon: netprobe.Monitor, model: nn.Module, opt: torch.optim.Optimizer, batch, steps: int
) -> list[dict[str, dict[str, float]]]:
    """`steps` steps on `batch` (tests.helpers.train_steps), and after each the naive stats of
    every gradient the step had, by parameter name."""
    seen: list[dict[str, dict[str, float]]] = []

    def note() -> None:  # after opt.step(), which leaves the gradients as they were
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        seen.append({n: naive_stats(g.double().numpy()) for n, g in grads.items()})

    train_steps(mon, model, opt, [batch] * steps, after=note)
    return seen


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
    with netprobe.attach(model, tmp_path, probes=["gradients"], probe_batch=(x, y)) as mon:
        seen = train_seeing(mon, model, opt, (x, y), 3)
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


class Branchy(nn.Module):
    """Weights among norm parameters and biases, and a head used only when asked."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.hidden = nn.Linear(4 * 6 * 6, 8)
        self.out = nn.Linear(8, 3, bias=False)
        self.spare = nn.Linear(8, 3)

        self.use_spare = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.hidden(self.norm(self.conv(x)).flatten(1)))
        return self.out(h) + (self.spare(h) if self.use_spare else 0)


def test_stored_gradients_of_weights_at_uneven_places_match_naive_loop(
    tmp_path, monkeypatch, kernel_path
):
    """Tracked weights at trained positions 0, 4, 6 and 7: on the CPU their rows are picked from
    the monitor's read of every gradient, except at a step where a parameter has none (the
    spare head unused), when the probe reads its own; the stored values are the naive ones
    either way."""
    torch.manual_seed(3)
    model = Branchy()
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    own_reads = []
    own_read = Gradients._read
    monkeypatch.setattr(Gradients, "_read", lambda self: own_reads.append(1) or own_read(self))
    with netprobe.attach(model, tmp_path, probes=["gradients"], probe_batch=(x, y)) as mon:
        seen = train_seeing(mon, model, opt, (x, y), 1)
        model.use_spare = False  # step 1 leaves the spare head without a gradient
        seen += train_seeing(mon, model, opt, (x, y), 1)
        model.use_spare = True
        seen += train_seeing(mon, model, opt, (x, y), 1)
    # The fused path reads only at the step without the spare head's gradients.
    assert len(own_reads) == (1 if kernel_path != "torch" else 3)
    df = netprobe.load(tmp_path).scalars(probe="gradients")
    weights = {"conv.weight", "hidden.weight", "out.weight", "spare.weight"}
    assert set(df["layer"]) - {""} == weights
    assert set(df[df["step"] == 1]["layer"]) - {""} == weights - {"spare.weight"}
    for row in df[df["layer"] != ""].itertuples():
        assert rel_err(row.value, seen[row.step][row.layer][row.metric]) <= 1e-6
    totals = df[df["metric"] == "grad_l2_total"].set_index("step")["value"]
    for step, stats in enumerate(seen):
        assert rel_err(totals[step], sum(s["l2"] ** 2 for s in stats.values()) ** 0.5) <= 1e-6


@pytest.mark.parametrize("case", ["every 3", "frozen", "tied"])
def test_the_monitors_rows_are_read_only_where_gradients_takes_them(
    tmp_path, monkeypatch, kernel_path, case
):
    """The monitor reads each gradient's statistics only at the steps `gradients` records, and
    never where it cannot take them (a tracked weight frozen at attach: it reads its own); a
    weight used twice is one parameter, one row. Stored values are the naive ones throughout."""
    torch.manual_seed(4)
    shared = nn.Linear(6, 6)
    model = nn.Sequential(nn.Linear(12, 6), nn.ReLU(), shared, nn.ReLU(), shared, nn.Linear(6, 3))
    if case == "frozen":
        model[0].weight.requires_grad_(False)
    x, y = torch.randn(16, 12), torch.randint(0, 3, (16,))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    reads = []
    with_rows = TotalNorm.with_rows
    monkeypatch.setattr(
        TotalNorm, "with_rows", lambda self, *a: reads.append(1) or with_rows(self, *a)
    )
    probes = {"gradients": {"every": 3 if case == "every 3" else 1}}
    with netprobe.attach(model, tmp_path, probes=probes, probe_batch=(x, y)) as mon:
        seen = train_seeing(mon, model, opt, (x, y), 6)
    fused = kernel_path != "torch"
    assert len(reads) == (0 if case == "frozen" or not fused else 2 if case == "every 3" else 6)
    df = netprobe.load(tmp_path).scalars(probe="gradients")
    rows = df[df["layer"] != ""]
    assert sorted(set(rows["step"])) == ([0, 3] if case == "every 3" else list(range(6)))
    weights = {"0.weight", "2.weight", "5.weight"} - ({"0.weight"} if case == "frozen" else set())
    assert set(rows["layer"]) == weights
    for row in rows.itertuples():
        assert rel_err(row.value, seen[row.step][row.layer][row.metric]) <= 1e-6


def test_picker_takes_a_view_where_rows_are_evenly_spaced():
    rows = np.arange(24.0).reshape(8, 3)
    assert picker([1, 3, 5]) == slice(1, 6, 2)
    assert np.shares_memory(rows[picker([1, 3, 5])], rows)
    assert picker([4]) == slice(4, 5, 1)
    np.testing.assert_array_equal(rows[picker([0, 4, 6, 7])], rows[[0, 4, 6, 7]])
    np.testing.assert_array_equal(rows[picker([5, 2])], rows[[5, 2]])
    assert picker([0, None]) is None and picker([]) is None


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
