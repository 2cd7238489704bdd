"""module_outputs: one eval-mode pass whose hooks and mode changes leave no trace."""

from __future__ import annotations

import torch
import torch.nn as nn

from netprobe.probes.module_outputs import flatten_features, module_outputs, seeded_subset


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
