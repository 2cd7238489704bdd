"""correlation against numpy: Pearson (np.corrcoef), linear CKA (its formula), schedules."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
import torch.nn as nn

from netprobe.errors import ConfigError
from netprobe.probes import PROBES, ProbeRunner, StepState, probe_context
from netprobe.probes.correlation import (
    Correlation,
    correlate,
    gram_matrices,
    linear_cka,
    pearson,
    standardize,
)
from netprobe.structure import layer_table

REL = 1e-5


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(inplace=True),
        nn.Conv2d(6, 8, 3, stride=2),
        nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(8 * 3 * 3, 5),
    )


def make_probe(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **cfg) -> Correlation:
    state = StepState()
    probe = PROBES["correlation"](probe_context(model, (x, y), seed=3, state=state), **cfg)
    probe.runner = ProbeRunner([probe], state)  # calls its hooks as the monitor's does
    return probe


def batch(shape=(40, 3, 8, 8), seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen), torch.randint(0, 5, (shape[0],), generator=gen)


def matrices(probe: Correlation) -> pd.DataFrame:
    return (
        probe.ctx.record.drain()["matrices"]
        .to_pandas()
        .astype({"probe": str, "name": str, "row": str, "col": str})
    )


def features_by_hand(model: nn.Module, x: torch.Tensor, names: list[str], conv: str):
    """The module outputs as [B, d] numpy arrays, from a plain eval forward with hooks."""
    outputs = {}
    modules = dict(model.named_modules())

    def keep(name: str):
        def hook(_m, _i, out) -> None:  # returns None: the model goes on with its own output
            outputs.setdefault(name, out.detach().clone())

        return hook

    handles = [modules[n].register_forward_hook(keep(n)) for n in names]
    model.eval()
    with torch.no_grad():
        model(x)
    model.train()
    for h in handles:
        h.remove()
    out = {}
    for n in names:
        o = outputs[n].double().numpy()
        if o.ndim == 4:
            o = o.mean(axis=(2, 3)) if conv == "pool" else o.reshape(len(o), -1)
        out[n] = o
    return out


def cka_by_formula(x: np.ndarray, y: np.ndarray) -> float:
    xc, yc = x - x.mean(0), y - y.mean(0)
    num = np.linalg.norm(yc.T @ xc, "fro") ** 2
    return num / (np.linalg.norm(xc.T @ xc, "fro") * np.linalg.norm(yc.T @ yc, "fro"))


def test_pearson_matches_numpy_corrcoef() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 7))
    b = a[:, :3] @ rng.normal(size=(3, 4)) + 0.5 * rng.normal(size=(50, 4))
    got = pearson(torch.from_numpy(a).float(), torch.from_numpy(b).float()).numpy()
    a32, b32 = a.astype(np.float32).astype(np.float64), b.astype(np.float32).astype(np.float64)
    want = np.corrcoef(a32, b32, rowvar=False)[:7, 7:]
    np.testing.assert_allclose(got, want, rtol=REL)


def test_constant_features_correlate_zero_not_nan() -> None:
    x = torch.randn(20, 4)
    x[:, 2] = 1.5
    c = pearson(x, x)
    assert torch.isfinite(c).all()
    assert (c[2] == 0).all() and (c[:, 2] == 0).all()
    assert torch.isfinite(linear_cka([x, torch.zeros(20, 3)])).all()


def test_corr_mean_matches_a_loop() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(size=(30, 6))
    b = a[:, :4] + rng.normal(size=(30, 4))
    for x, y, same in ((a, b, False), (a, a, True)):
        c = np.corrcoef(x, y, rowvar=False)[: x.shape[1], x.shape[1] :]
        pairs = [(i, j) for i in range(c.shape[0]) for j in range(c.shape[1]) if not same or i != j]
        want = sum(max(c[i, j], 0.0) for i, j in pairs) / len(pairs)
        z = [standardize(torch.from_numpy(v)) for v in (x, y)]
        got, full = correlate(*z, same_layer=same)
        assert full is None
        assert float(got) == pytest.approx(want, rel=1e-12)


def test_blocks_give_the_unchunked_values() -> None:
    """Blocks of 3 features (uneven: 10 = 3 + 3 + 3 + 1) give what one block of all gives."""
    rng = np.random.default_rng(4)
    a = torch.from_numpy(rng.normal(size=(25, 10))).float()
    b = torch.from_numpy(rng.normal(size=(25, 7))).float()
    b[:, 2] = 0.5  # a constant feature inside a block
    for x, y, same in ((a, b, False), (a, a, True)):
        z = standardize(x), standardize(y)
        mean, full = correlate(*z, same_layer=same, keep=True, block=3)
        mean_one, full_one = correlate(*z, same_layer=same, keep=True, block=1000)
        assert float(mean) == pytest.approx(float(mean_one), rel=1e-12)
        assert full.dtype == torch.float32
        torch.testing.assert_close(full, full_one, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(full, pearson(x, y).float(), rtol=1e-6, atol=1e-7)
    grams = [gram_matrices([a, b], block=k) for k in (3, 1000)]
    torch.testing.assert_close(grams[0], grams[1], rtol=1e-12, atol=1e-12)


def test_linear_cka_matches_formula_and_invariances() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(30, 8))
    y = np.tanh(x @ rng.normal(size=(8, 5))) + 0.3 * rng.normal(size=(30, 5))
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    feats = [torch.from_numpy(v) for v in (x, y, x @ q, 3.7 * x)]
    cka = linear_cka(feats).numpy()
    assert cka[0, 1] == pytest.approx(cka_by_formula(x, y), rel=REL)
    assert cka[1, 0] == pytest.approx(cka[0, 1], rel=REL)
    assert cka[0, 2] == pytest.approx(1.0, rel=REL)  # orthogonal transform
    assert cka[0, 3] == pytest.approx(1.0, rel=REL)  # isotropic scaling
    np.testing.assert_allclose(np.diag(cka), 1.0, rtol=REL)


@pytest.mark.parametrize("conv", ["pool", "flatten"])
def test_probe_records_against_numpy(conv: str) -> None:
    model = small_cnn()
    x, y = batch()
    probe = make_probe(model, x, y, conv=conv, max_features=1000, save_full_at=["start"])
    names = ["0", "3", "6"]
    assert [n for n, _ in probe.modules] == names  # conv and linear by default, forward order
    probe.runner.start()
    df = matrices(probe)
    feats = features_by_hand(model, x, names, conv)
    for i, a in enumerate(names):
        for b in names[i:]:
            want = np.corrcoef(feats[a], feats[b], rowvar=False)[: feats[a].shape[1]]
            want = want[:, feats[a].shape[1] :]
            full = df[(df["name"] == "C") & (df["row"] == a) & (df["col"] == b)]
            assert len(full) == 1
            got = full["values"].iloc[0].reshape(full["shape"].iloc[0])
            np.testing.assert_allclose(got, want, rtol=REL, atol=1e-6)
            mean = df[(df["name"] == "corr_mean") & (df["row"] == a) & (df["col"] == b)]
            positive = np.clip(want, 0, None)
            ref = (
                (positive.sum() - np.trace(positive)) / (want.size - len(want))
                if a == b
                else (positive.mean())
            )
            assert float(mean["values"].iloc[0][0]) == pytest.approx(ref, rel=REL)
            cka = df[(df["name"] == "cka") & (df["row"] == a) & (df["col"] == b)]
            assert float(cka["values"].iloc[0][0]) == pytest.approx(
                cka_by_formula(feats[a], feats[b]), rel=REL
            )
    assert not ((df["name"] == "C") & (df["row"] == "6") & (df["col"] == "0")).any()


def test_feature_subset_is_seeded_fixed_and_capped() -> None:
    model = small_cnn()
    x, y = batch()
    probe = make_probe(
        model, x, y, conv="flatten", max_features=20, save_full_at=["start", "epoch"]
    )
    probe.runner.start()
    first = matrices(probe)
    with torch.no_grad():
        model[0].weight.mul_(1.1)
    probe.runner.state.step = 5
    probe.runner.end_epoch()
    second = matrices(probe)
    full = first[first["name"] == "C"]
    assert all(max(s) <= 20 for s in full["shape"])
    # conv 0 has 6·8·8 = 384 features: the same 20 at every capture, the same for the same seed.
    pick = probe.extract.picks["0"]
    assert pick is not None and len(pick) == 20
    again = make_probe(small_cnn(), x, y, conv="flatten", max_features=20)
    again.runner.start()
    assert torch.equal(again.extract.picks["0"], pick)
    feats = features_by_hand(model, x, ["0"], "flatten")["0"][:, pick.numpy()]
    got = second[(second["name"] == "C") & (second["row"] == "0") & (second["col"] == "0")]
    want = np.corrcoef(feats, rowvar=False)
    np.testing.assert_allclose(got["values"].iloc[0].reshape(20, 20), want, rtol=REL, atol=1e-6)


def test_schedule_saves_full_matrices_at_start_and_last_capture_only() -> None:
    model = small_cnn()
    x, y = batch()
    probe = make_probe(model, x, y)
    progress = probe.runner.state
    probe.runner.start()
    for _ in range(3):
        progress.step += 4
        probe.runner.end_epoch()
    probe.runner.end()
    df = matrices(probe)
    assert sorted(df.loc[df["name"] == "corr_mean", "step"].unique()) == [0, 4, 8, 12]
    assert sorted(df.loc[df["name"] == "C", "step"].unique()) == [0, 12]
    pairs = 3 * 4 // 2
    assert (df[df["name"] == "corr_mean"].groupby("step").size() == pairs).all()
    assert (df[df["name"] == "C"].groupby("step").size() == pairs).all()


def test_modes_restored_and_outputs_unchanged_by_inplace_ops() -> None:
    model = small_cnn()
    model.train()
    model[1].eval()  # a frozen BatchNorm stays frozen
    x, y = batch()
    probe = make_probe(model, x, y, save_full_at=[])
    stats = model[1].running_mean.clone()
    probe.runner.start()
    assert model.training and not model[1].training and model[0].training
    assert torch.equal(model[1].running_mean, stats)
    # conv 3's output goes through an in-place ReLU; its kept features must still go negative.
    names, feats = probe.features()
    assert names[1] == "3" and (feats[1] < 0).any()


def test_layer_table_restores_each_modules_mode() -> None:
    model = small_cnn()
    model.train()
    model[1].eval()
    layer_table(model, batch()[0])
    assert model.training and model[0].training and not model[1].training


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"layers": ["nothing.*"]}, "matches nothing"),
        ({"conv": "max"}, "conv='max'"),
        ({"max_features": 1}, "max_features=1"),
        ({"save_full_at": ["middle"]}, "'middle'"),
        ({"at": ["sometimes"]}, "'sometimes'"),
        ({"bins": 3}, "unknown key 'bins'"),
        ({"cka": "debiased"}, "cka='debiased'; valid: biased, unbiased, both"),
    ],
)
def test_bad_settings_fail_with_one_line(cfg: dict, message: str) -> None:
    x, y = batch()
    with pytest.raises(ConfigError, match=message):
        make_probe(small_cnn(), x, y, **cfg)


def test_layers_select_by_regex() -> None:
    x, y = batch()
    probe = make_probe(small_cnn(), x, y, layers=[r"[0-4]"], exclude=["1", "2", "4"])
    assert [n for n, _ in probe.modules] == ["0", "3"]


# ckatorch's functions, written out from their formulas: a linear kernel K = X Xᵀ on the raw
# features (no centring), HSIC_0 with the centring matrix H, HSIC_1 on zero-diagonal Grams.
def ckatorch_hsic0(k: np.ndarray, l_: np.ndarray) -> float:
    n = len(k)
    h = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(k @ h @ l_ @ h)) / (n - 1) ** 2


def ckatorch_hsic1(k: np.ndarray, l_: np.ndarray) -> float:
    n = len(k)
    k, l_ = k - np.diag(np.diag(k)), l_ - np.diag(np.diag(l_))
    ones = np.ones(n)
    trace = np.trace(k @ l_)
    middle = (ones @ k @ ones) * (ones @ l_ @ ones) / ((n - 1) * (n - 2))
    last = 2 / (n - 2) * (ones @ k @ l_ @ ones)
    return float(trace + middle - last) / (n * (n - 3))


def ckatorch_cka(x: np.ndarray, y: np.ndarray, hsic) -> float:
    k, l_ = x @ x.T, y @ y.T
    return hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_))


def cka_features(seed: int = 5) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(24, 9)) + 3.0  # off-centre: the estimators must centre (or not need to)
    y = np.tanh(x @ rng.normal(size=(9, 6))) + 0.4 * rng.normal(size=(24, 6))
    z = rng.normal(size=(24, 40))  # unrelated and wider than the batch: where the biased one errs
    return [x, y, z]


@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_matches_ckatorch_formulas_in_float64(unbiased: bool) -> None:
    feats = cka_features()
    got = linear_cka([torch.from_numpy(f) for f in feats], unbiased=unbiased)
    assert got.dtype == torch.float64
    hsic = ckatorch_hsic1 if unbiased else ckatorch_hsic0
    for i, a in enumerate(feats):
        for j, b in enumerate(feats):
            assert float(got[i, j]) == pytest.approx(ckatorch_cka(a, b, hsic), rel=1e-10)
    if not unbiased:  # the float64 reference of the feature-space form, too
        assert float(got[0, 1]) == pytest.approx(cka_by_formula(feats[0], feats[1]), rel=1e-12)


def test_unbiased_estimator_removes_the_bias_of_unrelated_features() -> None:
    """Independent features: the biased estimate sits well above 0, the unbiased one near it."""
    rng = np.random.default_rng(6)
    biased, unbiased = [], []
    for _ in range(20):
        x, z = rng.normal(size=(30, 50)), rng.normal(size=(30, 50))
        feats = [torch.from_numpy(x), torch.from_numpy(z)]
        biased.append(float(linear_cka(feats)[0, 1]))
        unbiased.append(float(linear_cka(feats, unbiased=True)[0, 1]))
    assert np.mean(biased) > 0.5
    assert abs(np.mean(unbiased)) < 0.05


@pytest.mark.parametrize("which", ["biased", "unbiased", "both"])
def test_probe_stores_the_chosen_estimators_in_float64(which: str) -> None:
    model = small_cnn()
    x, y = batch()
    probe = make_probe(model, x, y, conv="flatten", max_features=50, cka=which, save_full_at=[])
    probe.runner.start()
    table = probe.ctx.record.drain()["matrices"]
    assert table.schema.field("values").type == pa.list_(pa.float64())
    df = table.to_pandas().astype({"name": str, "row": str, "col": str})
    names = {"biased": {"cka"}, "unbiased": {"cka_unbiased"}, "both": {"cka", "cka_unbiased"}}
    assert set(df["name"]) == {"corr_mean"} | names[which]
    feats = {n: f.double().numpy() for n, f in zip(*probe.features())}
    for name, hsic in (("cka", ckatorch_hsic0), ("cka_unbiased", ckatorch_hsic1)):
        for _, row in df[df["name"] == name].iterrows():
            want = ckatorch_cka(feats[row["row"]], feats[row["col"]], hsic)
            assert row["values"][0] == pytest.approx(want, rel=1e-9)


def test_chunked_capture_equals_the_unchunked_one(monkeypatch: pytest.MonkeyPatch) -> None:
    from netprobe.probes import correlation

    x, y = batch()
    stored = []
    for block in (7, 10_000):  # 7: every layer's features and Gram sums go in several blocks
        monkeypatch.setattr(correlation, "BLOCK", block)
        probe = make_probe(small_cnn(), x, y, conv="flatten", max_features=64, cka="both")
        probe.runner.start()
        stored.append(matrices(probe))
    chunked, whole = stored
    assert len(chunked) == len(whole) and (chunked["name"] == whole["name"]).all()
    for a, b in zip(chunked["values"], whole["values"]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_unbiased_needs_four_samples() -> None:
    x, y = batch(shape=(3, 3, 8, 8))
    with pytest.raises(ConfigError, match="at least 4 samples"):
        make_probe(small_cnn(), x, y, cka="unbiased")
