"""channels against an explicit loop over channel pairs, one autograd call per pair."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from netprobe.errors import ConfigError
from netprobe.probes import PROBES, ProbeRunner, StepState, probe_context
from netprobe.probes.channels import Channels, channel_pair_norms

REL = 1e-5
# PyTorch notes that an even kernel with padding="same" pads a copy of the input: expected here.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")


class Net(nn.Module):
    """A plain conv, a strided, padded and dilated one, an even-kernel `same` one, a depthwise.

    c1 and c3 have C_in ≤ k² (maps made per pair), c2 has C_in > k² (the Gram-matrix path).
    """

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 12, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.c2 = nn.Conv2d(12, 5, 3, stride=2, padding=2, dilation=2)
        self.c3 = nn.Conv2d(5, 6, 4, padding="same")
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.c1(x))
        h = self.act(self.c2(h))
        h = self.act(self.bn(self.dw(self.act(self.c3(h)))))
        return self.fc(h.mean(dim=(2, 3)))


def make_probe(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **cfg) -> Channels:
    state = StepState()
    probe = PROBES["channels"](probe_context(model, (x, y), state=state), **cfg)
    probe.runner = ProbeRunner([probe], state)  # calls its hooks as the monitor's does
    return probe


def batch(shape=(6, 3, 11, 10), seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen), torch.randint(0, 5, (shape[0],), generator=gen)


def reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str]):
    """Em and Ab per conv in float64: ∂L/∂y by autograd on an eval-mode copy without in-place
    ops, then per channel pair (c1, c2) LG = the gradient, by autograd, of ⟨g[:, c1], conv2d(·,
    W[c1, c2])⟩ with respect to the conv's input channel c2. conv2d is called with the module's own
    stride, padding (`same` included) and dilation, so no padding rule is rebuilt here."""
    plain = copy.deepcopy(model).double().eval()
    for m in plain.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    modules = dict(plain.named_modules())
    outputs, inputs = {}, {}

    def keep(name: str):
        def hook(_m, inp, out) -> None:
            outputs[name], inputs[name] = out, inp[0].shape

        return hook

    for n in names:
        modules[n].register_forward_hook(keep(n))
    loss = F.cross_entropy(plain(x.double()), y)
    grads = torch.autograd.grad(loss, [outputs[n] for n in names])
    result = {}
    for n, g in zip(names, grads):
        conv = modules[n]
        w = conv.weight.detach()
        c_out, c_in = w.shape[:2]
        # The conv is linear in its input: the gradient does not depend on where it is taken.
        x_in = torch.zeros(inputs[n][0], 1, *inputs[n][2:], dtype=torch.float64, requires_grad=True)
        norms = np.zeros((c_out, c_in))
        for c1 in range(c_out):
            for c2 in range(c_in):
                out = F.conv2d(
                    x_in,
                    w[c1 : c1 + 1, c2 : c2 + 1],
                    stride=conv.stride,
                    padding=conv.padding,
                    dilation=conv.dilation,
                )
                (lg,) = torch.autograd.grad(out, x_in, grad_outputs=g[:, c1 : c1 + 1])
                norms[c1, c2] = float(lg.square().sum().sqrt())
        result[n] = (norms.sum(axis=1), norms.sum(axis=0))
    return result


def stored(probe: Channels) -> tuple[pd.DataFrame, pd.DataFrame]:
    tables = probe.ctx.record.drain()
    m = tables["matrices"].to_pandas().astype({"name": str, "row": str})
    s = tables["scalars"].to_pandas().astype({"layer": str, "metric": str})
    return m, s


@pytest.mark.parametrize("chunk", [1, 4, 16])
def test_emission_absorption_match_a_loop_over_pairs(chunk: int) -> None:
    torch.manual_seed(0)
    model = Net()
    x, y = batch()
    probe = make_probe(model, x, y, chunk=chunk)
    assert [n for n, _ in probe.modules] == ["c1", "c2", "c3"]  # not the depthwise conv
    probe.runner.end()
    matrices, scalars = stored(probe)
    want = reference(model, x, y, ["c1", "c2", "c3"])
    for name, (em, ab) in want.items():
        got_em = matrices[(matrices["name"] == "emission") & (matrices["row"] == name)]
        got_ab = matrices[(matrices["name"] == "absorption") & (matrices["row"] == name)]
        np.testing.assert_allclose(got_em["values"].iloc[0], em, rtol=REL)
        np.testing.assert_allclose(got_ab["values"].iloc[0], ab, rtol=REL)
        values = dict(
            zip(
                scalars.loc[scalars["layer"] == name, "metric"],
                scalars["value"][scalars["layer"] == name],
            )
        )
        assert values["em_mean"] == pytest.approx(em.mean(), rel=REL)
        assert values["em_std"] == pytest.approx(em.std(), rel=REL)
        assert values["ab_mean"] == pytest.approx(ab.mean(), rel=REL)
        assert values["ab_std"] == pytest.approx(ab.std(), rel=REL)


@pytest.mark.parametrize("stride, padding, dilation", [(1, 1, 1), (2, 1, 1), (2, 2, 2), (3, 0, 2)])
def test_one_channel_pair_is_the_input_gradient(stride: int, padding: int, dilation: int) -> None:
    """With one channel in and out, LG^{0→0} is ∂L/∂x itself (autograd), whatever the geometry."""
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 1, 3, stride=stride, padding=padding, dilation=dilation)
    x = torch.randn(4, 1, 13, 12, requires_grad=True)
    out = conv(x)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    norms = channel_pair_norms(
        g, conv.weight.detach(), (13, 12), conv.stride, conv.padding, conv.dilation
    )
    assert float(norms[0, 0]) == pytest.approx(float(gx.double().norm()), rel=REL)


def test_parameters_grad_and_modes_untouched() -> None:
    torch.manual_seed(0)
    model = Net()
    model.train()
    model.bn.eval()
    x, y = batch()
    stats = model.bn.running_mean.clone()
    probe = make_probe(model, x, y)
    probe.runner.end()
    assert all(p.grad is None for p in model.parameters())
    assert model.training and model.c1.training and not model.bn.training
    assert torch.equal(model.bn.running_mean, stats)


def test_models_without_convs_record_nothing() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 11 * 10, 5))
    x, y = batch()
    probe = make_probe(model, x, y)
    probe.runner.end()
    assert len(probe.ctx.record) == 0


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"layers": ["nothing"]}, "matches nothing"),
        ({"layers": ["fc", "dw"]}, "select no Conv2d with groups=1"),
        ({"chunk": 0}, "chunk=0"),
    ],
)
def test_bad_settings_fail_with_one_line(cfg: dict, message: str) -> None:
    x, y = batch()
    with pytest.raises(ConfigError, match=message):
        make_probe(Net(), x, y, **cfg)


def test_layers_pick_convs_by_regex() -> None:
    x, y = batch()
    probe = make_probe(Net(), x, y, layers=["c.*", "dw"], exclude=["c1"])
    assert [n for n, _ in probe.modules] == ["c2", "c3"]
