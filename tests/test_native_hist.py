"""The fused activations kernel (netprobe.native.hist) against numpy: histogram counts of a binary
search in the stored edges, float64 moments, zero and dead shares, the same bits on any number
of threads."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from netprobe import native
from netprobe.native import hist
from tests.helpers import OTHER_BUILDS, other_build, torch_threads

pytestmark = pytest.mark.skipif(
    native.compiler() is None or not native.ENABLED,
    reason="no C compiler, or NETPROBE_NATIVE=0: the fused kernel is not built",
)


def reference(x: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[mean, std, skew, zero_frac, dead_frac] and counts (below, bins…, above) of x [B, d]."""
    flat = x.astype(np.float64).ravel()
    finite = flat[~np.isnan(flat)]
    inside, _ = np.histogram(finite[np.isfinite(finite)], edges)
    counts = [(finite < edges[0]).sum(), *inside, (finite > edges[-1]).sum()]
    mean = flat.sum() / flat.size
    d = flat - mean
    std = np.sqrt((d**2).mean())
    skew = (d**3).mean() / std**3 if std > 0 else 0.0
    dead = (x <= 0).all(axis=0).mean()
    return np.array([mean, std, skew, (flat <= 0).mean(), dead]), np.array(counts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_counts_on_edges_outside_and_not_finite(dtype: torch.dtype) -> None:
    edges = torch.linspace(-1.0, 1.0, 9, dtype=torch.float64)
    special = [-2.0, 1.0, 1.5, math.inf, -math.inf, math.nan, 0.0, -0.0]
    x = torch.tensor([*edges.tolist(), *special, *(edges[:-1] + 1e-9).tolist()], dtype=dtype)
    x = torch.cat([x, x.flip(0)]).reshape(2, -1)
    stats, counts = hist.activation_stats(x, edges)
    finite = x[torch.isfinite(x)].to(torch.float64).numpy()
    inside, _ = np.histogram(finite, edges.numpy())  # the last bin closed
    np.testing.assert_array_equal(counts[1:-1].numpy(), inside)
    ends = [int((x < -1).sum()), int((x > 1).sum())]  # ±inf count below and above, NaN nowhere
    assert [int(counts[0]), int(counts[-1])] == ends
    assert stats[3] == pytest.approx(float((x <= 0).sum()) / x.numel())


def test_counts_of_uneven_and_repeated_edges_are_a_binary_search() -> None:
    """The bin guessed from the edges' spacing is moved to the right one whatever the edges."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 500, generator=gen, dtype=torch.float64) * 3
    for edges in (
        torch.tensor([-4.0, -1e-3, 0.0, 0.0, 0.0, 1e-3, 2.0, 2.0, 9.0], dtype=torch.float64),
        torch.linspace(0, 1, 41, dtype=torch.float64).pow(3) * 8 - 4,  # dense at -4, sparse at 4
    ):
        x[0, : len(edges)] = edges  # values on every edge
        _, counts = hist.activation_stats(x, edges)
        closed = torch.cat([edges[:-1], torch.nextafter(edges[-1:], torch.tensor([math.inf]))])
        slots = np.searchsorted(closed.numpy(), x.numpy().ravel(), side="right")
        np.testing.assert_array_equal(counts.numpy(), np.bincount(slots, minlength=len(edges) + 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_moments_and_shares_match_numpy_and_threads_change_no_bit(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    # 601 × 999 values: blocks, rows that straddle them, a last block of 7 (or 4) past the
    # vectors (the threads' share of a job: test_the_same_bits_on_any_vector_width[threads]).
    x = torch.relu(torch.randn(601, 999, generator=gen, dtype=dtype) + 0.5)
    x[:, :37] = -torch.rand(601, 37, generator=gen, dtype=dtype)  # 37 dead units
    x[5, 40] = torch.nan  # NaN is not ≤ 0: that unit lives
    x[:, 40] = torch.where(torch.arange(601) == 5, x[:, 40], -1.0)
    x = x[:, ::2] if dtype == torch.float64 else x  # a strided view is read as a copy
    edges = torch.linspace(0.0, 3.0, 51, dtype=torch.float64)
    stats, counts = hist.activation_stats(x, edges)
    want, want_counts = reference(x.numpy(), edges.numpy())
    np.testing.assert_array_equal(counts.numpy(), want_counts)
    assert stats[3:].tolist() == want[3:].tolist()  # counts divided: exact
    assert math.isnan(stats[0]) and math.isnan(stats[1])  # NaN propagates, as in PyTorch

    clean = x.clone()
    clean[5, 40 if dtype == torch.float32 else 20] = 0.0  # that unit is dead now
    runs = []
    for n in (1, 2, 3):
        with torch_threads(n):
            runs.append(hist.activation_stats(clean, edges))
    for stats, counts in runs[1:]:
        assert torch.equal(stats, runs[0][0]) and torch.equal(counts, runs[0][1])
    stats, counts = runs[0]
    want, want_counts = reference(clean.numpy(), edges.numpy())
    np.testing.assert_array_equal(counts.numpy(), want_counts)
    np.testing.assert_allclose(stats[:3].numpy(), want[:3], rtol=1e-12)
    assert stats[3:].tolist() == want[3:].tolist() and want[4] > 0.03


def test_the_pytorch_path_serves_where_the_kernel_does_not(monkeypatch) -> None:
    x = torch.randn(4, 6)
    edges = torch.linspace(-1, 1, 5, dtype=torch.float64)
    assert hist.activation_stats(x.half(), edges) is None
    assert hist.activation_stats(x[:0], edges) is None
    monkeypatch.setattr(native, "ENABLED", False)
    assert hist.activation_stats(x, edges) is None


@pytest.mark.parametrize("build", sorted(OTHER_BUILDS))
def test_the_same_bits_on_any_vector_width(build, tmp_path) -> None:
    """Built for SSE2 only, or AVX2 without AVX-512, or to share even a small job between 3
    threads, the kernel gives the bits of the build tuned for this CPU."""
    other, threads = other_build("hist.c", build, tmp_path)
    with torch_threads(threads):
        gen = torch.Generator().manual_seed(2)
        for dtype in (torch.float32, torch.float64):
            x = torch.randn(300, 1001, generator=gen, dtype=dtype).relu_()
            edges = torch.linspace(0.0, 2.5, 51, dtype=torch.float64)
            tuned, built = hist.activation_stats(x, edges), hist.compute(other, x, edges)
            assert torch.equal(tuned[0], built[0]) and torch.equal(tuned[1], built[1])
