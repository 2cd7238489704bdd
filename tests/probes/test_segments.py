"""Segment reductions of a flat buffer against per-tensor reductions of its pieces."""

import torch

from netprobe.probes.segments import Segments


def test_reductions_match_each_piece():
    torch.manual_seed(0)
    sizes = [6, 6, 6, 4, 9, 9, 0, 5]
    seg = Segments(sizes)
    # Consecutive equal sizes share one run (and one kernel per reduction).
    assert seg.runs == [(0, 3, 6), (18, 1, 4), (22, 2, 9), (40, 1, 0), (40, 1, 5)]
    flat = torch.randn(seg.total, dtype=torch.float64)
    pieces = flat.split(sizes)
    torch.testing.assert_close(seg.sum(flat), torch.stack([p.sum() for p in pieces]))
    torch.testing.assert_close(seg.norm(flat), torch.stack([p.norm() for p in pieces]))
    want_max = torch.stack([p.max() if len(p) else torch.zeros((), dtype=p.dtype) for p in pieces])
    torch.testing.assert_close(seg.amax(flat), want_max)


def test_counts_are_exact():
    torch.manual_seed(1)
    sizes = [2**20, 3, 2**20 + 7]
    seg = Segments(sizes)
    signs = torch.randint(-1, 2, (seg.total,)).float()
    pieces = signs.split(sizes)
    want = torch.tensor([float(p.abs().sum()) for p in pieces])
    assert torch.equal(seg.count_squares(signs), want)
    assert torch.equal(seg.count(signs.abs()), want)


def test_a_buffer_keeps_its_views_and_reduces_like_any_tensor():
    """The views `buffer` makes once see every later write, and reduce as fresh slices do."""
    torch.manual_seed(2)
    sizes = [6, 6, 4, 0, 5]
    seg = Segments(sizes)
    buf = seg.buffer(torch.float64, torch.device("cpu"))
    for step in range(2):  # written again: the views made at the start see the new values
        values = torch.randn(seg.total, dtype=torch.float64) + step
        buf.copy_(values)
        assert all(torch.equal(p, v) for p, v in zip(seg.parts(buf), values.split(sizes)))
        assert all(p.data_ptr() == v.data_ptr() for p, v in zip(seg.parts(buf), buf.split(sizes)))
        assert torch.equal(seg.sum(buf), seg.sum(values.clone()))
        assert torch.equal(seg.amax(buf), seg.amax(values.clone()))
