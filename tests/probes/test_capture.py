"""The capture toolkit: one eval-mode pass whose hooks and mode changes leave no trace, and one
rule for a module whose output is not a tensor, the same in every probe."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from netprobe.probes import PROBES, ProbeRunner, StepState, probe_context
from netprobe.probes.capture import flatten_features, module_outputs, output_tensor, seeded_subset

Pair = namedtuple("Pair", ["out", "given"])


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Flatten(),
        nn.Linear(3 * 4 * 4, 4),
    )  # fmt: skip


def test_outputs_are_eval_mode_values_untouched_by_inplace_ops() -> None:
    model = net().train()
    model[2].eval()
    x = torch.randn(5, 2, 4, 4)
    outs = module_outputs(model, [("0", model[0]), ("4", model[4])], x)
    with torch.no_grad():
        want_conv = model[0](x)
        want_out = model[4](torch.relu(want_conv).flatten(1))  # eval: dropout is the identity
    torch.testing.assert_close(outs.values["0"], want_conv)
    assert (outs.values["0"] < 0).any()  # the in-place ReLU after it did not reach it
    torch.testing.assert_close(outs.output, want_out)
    assert outs.input_shapes["0"] == x.shape
    assert not outs.output.requires_grad
    # modes restored module by module, hooks gone
    assert model.training and model[0].training and not model[2].training
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("view", [True, False])
def test_a_reduced_output_is_untouched_by_inplace_ops_and_a_copy_is_not_copied(view) -> None:
    model = net()
    x = torch.randn(5, 2, 4, 4)
    made, handed_on = [], []
    model[0].register_forward_hook(lambda _m, _i, out: made.append(out))
    model[1].register_forward_pre_hook(lambda _m, inputs: handed_on.append(inputs[0]))
    reduce = (lambda _n, y: y.flatten(1)) if view else (lambda _n, y: y.mean(dim=(2, 3)))
    outs = module_outputs(model, [("0", model[0])], x, reduce=reduce)
    with torch.no_grad():
        want = reduce("0", model[0](x))
    assert (want < 0).any()
    torch.testing.assert_close(outs.values["0"], want)  # the in-place ReLU did not reach it
    # The ReLU works on a clone only where the kept value is a view of the output.
    assert (handed_on[0] is not made[0]) == view


def test_grad_mode_keeps_graph_nodes() -> None:
    model = net()
    x = torch.randn(5, 2, 4, 4)
    outs = module_outputs(model, [("0", model[0])], x, grad=True)
    (g,) = torch.autograd.grad(outs.output.sum(), [outs.values["0"]])
    assert g.shape == (5, 3, 4, 4)
    assert all(p.grad is None for p in model.parameters())


def test_flatten_features_and_subset() -> None:
    y = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(flatten_features(y, "pool"), y.mean(dim=(2, 3)))
    assert flatten_features(y, "flatten").shape == (4, 12)
    assert seeded_subset(10, 20, torch.Generator().manual_seed(0)) is None
    pick = seeded_subset(100, 7, torch.Generator().manual_seed(0))
    assert pick is not None and len(pick.unique()) == 7 and bool((pick.diff() > 0).all())
    again = seeded_subset(100, 7, torch.Generator().manual_seed(0))
    assert torch.equal(pick, again)


def test_the_output_is_the_first_tensor_depth_first() -> None:
    a, b = torch.zeros(1), torch.ones(1)
    assert output_tensor(a) is a
    assert output_tensor((None, [b, a])) is b
    assert output_tensor(Pair(a, b)) is a
    assert output_tensor({"aux": None, "main": (b,)}) is b
    assert output_tensor(("text", 3)) is None


class ConvPair(nn.Conv2d):
    """A conv that also hands on its input, as a named pair: (output, input)."""

    def forward(self, x: torch.Tensor) -> Pair:
        return Pair(super().forward(x), x)


def test_a_tuple_output_keeps_its_first_tensor_safe_from_inplace_ops() -> None:
    torch.manual_seed(0)
    conv = ConvPair(2, 3, 3, padding=1)
    model = nn.Sequential(conv)
    x = torch.randn(4, 2, 5, 5)
    handed_on = []
    model.register_forward_hook(lambda _m, _i, out: handed_on.append(out))
    outs = module_outputs(model, [("0", conv)], x)
    with torch.no_grad():
        want = F.conv2d(x, conv.weight, conv.bias, padding=1)
    torch.testing.assert_close(outs.values["0"], want)
    # Downstream gets the same structure, with a copy of the kept tensor in its place.
    (out,) = handed_on
    assert isinstance(out, Pair) and out.given is x
    assert out.out is not outs.values["0"]
    out.out.relu_()
    assert (outs.values["0"] < 0).any()


class Twins(nn.Module):
    """Two equal convs on the same input, one returning a tuple: every probe must measure them
    alike, with the same gradient reaching both (the head is applied to each)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = ConvPair(2, 3, 3, padding=1)
        self.b = nn.Conv2d(2, 3, 3, padding=1)
        self.b.load_state_dict(self.a.state_dict())
        self.head = nn.Linear(3 * 5 * 5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ya, _ = self.a(x)
        return self.head(F.relu(ya).flatten(1)) + self.head(F.relu(self.b(x)).flatten(1))


def drive(name: str, probe, x: torch.Tensor, y: torch.Tensor, state: StepState) -> None:
    runner = ProbeRunner([probe], state)
    if name == "gradient_flow":
        runner.start()  # arms the hooks for step 0
        loss = F.cross_entropy(probe.ctx.model(x), y)
        loss.backward()
        runner.after_backward(loss.detach())
    elif name in ("augmentation", "channels"):
        runner.end()
    else:
        runner.start()


def rows_of(tables: dict, layer: str) -> list[str]:
    """Every recorded row about `layer` alone, with its name blanked, in a comparable order."""
    found = []
    for table in tables.values():
        for row in table.to_pylist():
            names = [row[k] for k in ("layer", "row", "col") if k in row]
            if layer in names and set(names) <= {layer, ""}:
                found.append(repr({k: "X" if v == layer else v for k, v in row.items()}))
    return sorted(found)


SETTINGS = {"augmentation": {"samples": 6, "chunk": 4, "show": 0}, "gradient_flow": {"every": 1}}


@pytest.mark.parametrize(
    "name", ["activations", "correlation", "augmentation", "channels", "gradient_flow"]
)
def test_a_module_returning_a_tuple_is_measured_like_one_returning_its_first_tensor(name) -> None:
    model = Twins()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 2, 5, 5, generator=gen), torch.randint(0, 4, (8,), generator=gen)
    state = StepState()
    ctx = probe_context(model, (x, y), (x, y), seed=2, state=state)
    probe = PROBES[name](ctx, layers=["a", "b"], **SETTINGS.get(name, {}))
    try:
        drive(name, probe, x, y, state)
    finally:
        probe.close()
    tables = ctx.record.drain()
    from_tuple, from_tensor = rows_of(tables, "a"), rows_of(tables, "b")
    assert from_tuple, f"{name} recorded nothing for the module returning a tuple"
    assert from_tuple == from_tensor
