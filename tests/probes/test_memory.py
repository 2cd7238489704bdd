"""probes.memory_budget: sizes parsed, estimates from shapes, captures over it refused up front."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import netprobe
from netprobe.errors import ConfigError
from netprobe.probes import build_probes, probe_context
from netprobe.probes.memory import check_budget, parse_budget, split_budget


def wide_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 16 * 16, 10),
    )


def batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 3, 16, 16), torch.randint(0, 10, (n,))


def built(probes: dict, model: nn.Module | None = None):
    ctx = probe_context(model or wide_cnn(), batch(), batch())
    return build_probes(ctx, probes)


@pytest.mark.parametrize(
    "value, expected",
    [("auto", None), (None, None), (1000, 1000), ("512MB", 512 * 10**6), ("1.5GiB", 3 * 2**29),
     ("2 gb", 2 * 10**9), ("4096", 4096)],
)  # fmt: skip
def test_budget_sizes(value, expected) -> None:
    assert parse_budget(value) == expected


@pytest.mark.parametrize("value", ["lots", "-1MB", 0, "5XB", True])
def test_bad_budget_names_the_key_and_the_choices(value) -> None:
    with pytest.raises(ConfigError, match=r"probes\.memory_budget=.*auto.*512MB"):
        parse_budget(value)


def test_split_budget_leaves_the_probe_groups() -> None:
    assert split_budget({"gradients": {"every": 1}, "memory_budget": "1GB"}) == (
        {"gradients": {"every": 1}},
        "1GB",
    )
    assert split_budget(None) == ({}, "auto")


def test_correlation_estimate_follows_its_settings() -> None:
    """Features 16·16·16 = 4096 per conv when flattened: the full C_ij of the three pairs of convs
    at 24 bytes a value dominate; without them the estimate grows only linearly."""
    d = 16 * 16 * 16
    (full,) = built({"correlation": {"conv": "flatten", "max_features": 10**6}})
    need, lower = full.memory_estimate()
    pairs = 3 * d * d + 2 * d * 10 + 10 * 10
    assert 24 * pairs <= need < 24 * pairs * 1.2
    assert lower == "probes.correlation.max_features or probes.correlation.save_full_at=[]"
    (summary,) = built(
        {"correlation": {"conv": "flatten", "max_features": 10**6, "save_full_at": []}}
    )
    # what remains: the features and one 2048 × 2048 block of C in float64 (and its clamp)
    assert 2 * 8 * 2048**2 < summary.memory_estimate()[0] < need / 10
    (pooled,) = built({"correlation": {}})
    assert pooled.memory_estimate()[0] < 10**6


def test_over_budget_is_refused_with_one_line_naming_the_fix() -> None:
    probes = built({"gradients": {}, "correlation": {"conv": "flatten", "max_features": 10**6}})
    check_budget(probes, "2GB")  # ≈ 1.3 GB
    with pytest.raises(ConfigError) as refused:
        check_budget(probes, "100MB")
    line = str(refused.value)
    assert "\n" not in line
    for word in ("probes.correlation needs about 1.3 GB", "probes.memory_budget (100MB",
                 "lower probes.correlation.max_features", "save_full_at=[]"):  # fmt: skip
        assert word in line, (word, line)


@pytest.mark.parametrize(
    "probes, setting",
    [({"augmentation": {"conv": "flatten", "max_features": 10**6}}, "augmentation.max_features"),
     ({"augmentation": {"samples": 20_000}}, "augmentation.samples"),
     ({"channels": {"chunk": 16}}, "channels.chunk")],
)  # fmt: skip
def test_other_captures_name_their_setting(probes: dict, setting: str) -> None:
    with pytest.raises(ConfigError, match=f"lower probes.{setting}"):
        check_budget(built(probes), "1MB")


def test_attach_refuses_before_writing_anything(tmp_path) -> None:
    model = wide_cnn()
    probes = {"correlation": {"conv": "flatten", "max_features": 10**6}}
    with pytest.raises(ConfigError, match="probes.correlation needs about"):
        netprobe.attach(model, tmp_path / "run", probes, batch(), memory_budget="100MB")
    assert not (tmp_path / "run").exists()
    assert not any(m._forward_hooks for m in model.modules())


def test_a_capture_holds_no_more_than_its_estimate(tmp_path) -> None:
    """What a capture leaves buffered for the flush (the full C_ij) stays under the estimate."""
    model = wide_cnn()
    probes = {"correlation": {"conv": "flatten", "max_features": 300}}
    with netprobe.attach(model, tmp_path / "run", probes, batch(), memory_budget="50MB") as mon:
        need = mon.probes[0].memory_estimate()[0]
        full = [m[-1] for m in mon.record._matrices if m[3] == "C"]
        held = sum(c.numel() * c.element_size() for c in full)
        assert 0 < 6 * held <= need  # 4 of its 24 bytes a value: the rest is the flush's copies
        run = netprobe.load(mon.path)
    assert run.matrices("correlation", "C")["values"].map(len).sum() == held // 4
