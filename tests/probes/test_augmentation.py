"""augmentation: the affine maps against pixel geometry, every statistic against numpy."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

from netprobe.errors import ConfigError
from netprobe.probes import PROBES, ProbeRunner, StepState, probe_context
from netprobe.probes.augmentation import Augmentation, affine_theta, augment, invariance

REL = 1e-5


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(6, 8, 3, stride=2),
        nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(8 * 3 * 3, 5),
    )


def batch(n: int = 40, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # a smooth image plus noise, so that shifting and rotating it changes the features gradually
    base = torch.linspace(-1, 1, 8)
    smooth = (base[None, :, None] * base[None, None, :]).expand(3, 8, 8)
    x = smooth + 0.5 * torch.randn(n, 3, 8, 8, generator=gen)
    return x, torch.randint(0, 5, (n,), generator=gen)


def make_probe(model: nn.Module, **cfg) -> Augmentation:
    x, y = batch()
    state = StepState()
    probe = PROBES["augmentation"](
        probe_context(model, (x, y), batch(10, seed=2), seed=7, state=state), **cfg
    )
    probe.runner = ProbeRunner([probe], state)  # calls its hooks as the monitor's does
    return probe


def drained(probe: Augmentation) -> dict[str, pd.DataFrame]:
    tables = probe.ctx.record.drain()
    plain = {"probe": str, "layer": str, "metric": str, "name": str, "row": str, "col": str}
    return {
        k: (df := t.to_pandas()).astype({c: v for c, v in plain.items() if c in df})
        for k, t in tables.items()
    }


def features_by_hand(model: nn.Module, x: torch.Tensor, name: str) -> np.ndarray:
    kept = []
    module = dict(model.named_modules())[name]
    handle = module.register_forward_hook(lambda _m, _i, out: kept.append(out.detach().clone()))
    model.eval()
    with torch.no_grad():
        model(x)
    handle.remove()
    out = kept[0].double().numpy()
    return out.mean(axis=(2, 3)) if out.ndim == 4 else out


def test_identity_leaves_the_image() -> None:
    x = torch.randn(3, 6, 10)
    theta = affine_theta(torch.zeros(1), torch.zeros(1, 2), torch.ones(1), 6, 10)
    torch.testing.assert_close(augment(x, theta)[0], x, rtol=1e-6, atol=1e-6)


def test_shift_by_one_pixel() -> None:
    x = torch.randn(2, 6, 10)
    shift = torch.tensor([[1 / 10, 0.0], [0.0, 1 / 6]])
    out = augment(x, affine_theta(torch.zeros(2), shift, torch.ones(2), 6, 10), "zeros")
    torch.testing.assert_close(out[0, :, :, 1:], x[:, :, :-1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[1, :, 1:, :], x[:, :-1, :], rtol=1e-6, atol=1e-6)
    assert out[0, :, :, 0].abs().max() < 1e-6


def test_theta_maps_pixels_like_the_inverse_transform() -> None:
    """p_in = R(−a)(p_out − t)/s in pixel units, about the centre, for a non-square image."""
    h, w = 6, 10
    angle, shift, scale = torch.tensor([25.0]), torch.tensor([[0.1, -0.2]]), torch.tensor([1.2])
    theta = affine_theta(angle, shift, scale, h, w)[0].double().numpy()
    a = np.deg2rad(25.0)
    rot_inv = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
    t_pix = np.array([0.1 * w, -0.2 * h])
    for p_out in ([1.5, -2.0], [-3.0, 0.5], [0.0, 0.0]):
        p_out = np.array(p_out)
        want = rot_inv @ (p_out - t_pix) / 1.2
        normalized = p_out / np.array([w / 2, h / 2])
        got = (theta[:, :2] @ normalized + theta[:, 2]) * np.array([w / 2, h / 2])
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)


def test_invariance_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    aug, full = rng.normal(size=(30, 7)) * 0.3, rng.normal(size=(50, 7))
    want = np.var(aug, axis=0).mean() / np.var(full, axis=0).mean()
    got = invariance(torch.from_numpy(aug), torch.from_numpy(full))
    assert float(got) == pytest.approx(want, rel=REL)
    assert float(invariance(torch.ones(5, 3), torch.ones(8, 3))) == 0.0


def test_probe_records_against_numpy() -> None:
    model = small_cnn()
    probe = make_probe(model, samples=24, chunk=10, show=24, max_features=1000, sample_index=3)
    assert [n for n, _ in probe.modules] == ["0", "5"]  # the first and the last tracked module
    probe.runner.end()
    tables = drained(probe)
    matrices, scalars = tables["matrices"], tables["scalars"]

    def stored(name: str, row: str = "") -> np.ndarray:
        hit = matrices[(matrices["name"] == name) & (matrices["row"] == row)]
        assert len(hit) == 1
        return np.asarray(hit["values"].iloc[0]).reshape(hit["shape"].iloc[0])

    original = stored("original")
    np.testing.assert_array_equal(original, probe.ctx.valid_batch[0][3].numpy())
    inputs = torch.from_numpy(stored("inputs").copy()).float()  # stored as float64, exactly
    assert inputs.shape == (24, 3, 8, 8)
    assert not torch.allclose(inputs[0], inputs[1])
    for name in ("0", "5"):
        aug = features_by_hand(model, inputs, name)
        full = features_by_hand(model, probe.ctx.probe_batch[0], name)
        np.testing.assert_allclose(
            stored("feature_corr", name), np.corrcoef(aug, rowvar=False), rtol=REL, atol=1e-6
        )
        np.testing.assert_allclose(
            stored("sample_corr", name), np.corrcoef(aug), rtol=REL, atol=1e-6
        )
        got = scalars[(scalars["layer"] == name) & (scalars["metric"] == "invariance")]
        want = np.var(aug, axis=0).mean() / np.var(full, axis=0).mean()
        assert float(got["value"].iloc[0]) == pytest.approx(want, rel=REL)


def test_augmentations_are_seeded_and_fixed() -> None:
    first, second = make_probe(small_cnn(), samples=8), make_probe(small_cnn(), samples=8)
    a, b = first.augmented(first.sample()), second.augmented(second.sample())
    torch.testing.assert_close(torch.cat(a), torch.cat(b), rtol=0, atol=0)
    again = first.augmented(first.sample())
    torch.testing.assert_close(torch.cat(a), torch.cat(again), rtol=0, atol=0)


def test_feature_cap_and_mode() -> None:
    model = small_cnn()
    model.train()
    probe = make_probe(model, samples=6, conv="flatten", max_features=10, show=0)
    probe.runner.end()
    matrices = drained(probe)["matrices"]
    shapes = dict(zip(matrices["name"] + ":" + matrices["row"], matrices["shape"]))
    assert list(shapes["feature_corr:0"]) == [10, 10]
    assert list(shapes["feature_corr:5"]) == [5, 5]
    assert list(shapes["sample_corr:0"]) == [6, 6]
    assert "inputs:" not in shapes
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"layers": ["nothing"]}, "matches nothing"),
        ({"padding": "wrap"}, "padding='wrap'"),
        ({"scale": [1.1, 0.9]}, "scale="),
        ({"scale": 1.0}, "scale="),
        ({"rotation": -5}, "rotation=-5"),
        ({"translate": 1.5}, "translate=1.5"),
        ({"samples": 1}, "samples=1"),
        ({"sample_index": 10}, "sample_index=10"),
        ({"conv": "max"}, "conv='max'"),
    ],
)
def test_bad_settings_fail_with_one_line(cfg: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_probe(small_cnn(), **cfg)


def test_preflight_checks_sample_index_against_the_probe_batch() -> None:
    from netprobe.checks import check_probes
    from netprobe.config import compose

    tiny = ["data=synthetic", "data.image_size=8", "data.probe_size=32", "model=cnn"]
    check_probes(compose([*tiny, "probes=[augmentation]", "probes.augmentation.sample_index=20"]))
    with pytest.raises(ConfigError, match="sample_index=32"):
        check_probes(
            compose([*tiny, "probes=[augmentation]", "probes.augmentation.sample_index=32"])
        )
