"""Fixed-bin histograms and moments of many tensors at once, on their device (weights, activations).

Tensors are reduced in chunks: each chunk is one flat float64 vector with a segment id per
element, so a capture costs a handful of kernels per chunk rather than per tensor, and memory
stays bounded by the chunk size (a single larger tensor forms a chunk of its own).
"""

from __future__ import annotations

import torch

MOMENTS = ["mean", "std", "skew", "min", "max", "l2"]
# Elements per chunk: about 80 bytes of temporaries each, so ~170 MB at the peak.
CHUNK = 1 << 21


def symmetric_edges(
    tensors: list[torch.Tensor], bins: int, nonnegative: bool = False, factor: float = 2.0
):
    """Edges [len(tensors), bins + 1] in float64: ±factor·max|x| per tensor (0…factor·max x when
    `nonnegative` and every value is ≥ 0). A tensor of zeros, or one that is not finite, gets ±1."""
    peak = factor * torch.stack(torch._foreach_norm(tensors, float("inf"), dtype=torch.float64))
    lo = -peak
    if nonnegative:
        mins = torch.stack([t.detach().min().to(torch.float64) for t in tensors])
        lo = torch.where(mins >= 0, torch.zeros_like(lo), lo)
    ok = torch.isfinite(peak) & (peak > 0)
    hi = torch.where(ok, peak, torch.ones_like(peak))
    lo = torch.where(ok, lo, -torch.ones_like(lo))
    steps = torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64, device=peak.device)
    edges = lo[:, None] + (hi - lo)[:, None] * steps
    edges[:, -1] = hi  # exact upper end, whatever the rounding of the sum
    return edges


def _segments(sizes: list[int], device: torch.device) -> torch.Tensor:
    counts = torch.tensor(sizes, device=device)
    return torch.repeat_interleave(
        torch.arange(len(sizes), device=device), counts, output_size=sum(sizes)
    )


def _chunks(sizes: list[int]) -> list[tuple[int, int]]:
    """[start, stop) ranges of tensor indices whose total size stays under CHUNK."""
    out, start, total = [], 0, 0
    for i, n in enumerate(sizes):
        if i > start and total + n > CHUNK:
            out.append((start, i))
            start, total = i, 0
        total += n
    if sizes:
        out.append((start, len(sizes)))
    return out


def _spread(values: torch.Tensor, seg: torch.Tensor | None) -> torch.Tensor:
    """Per-segment `values` [S] as one value per element (a broadcast scalar for one segment)."""
    return values if seg is None else values[seg]


def _segment_sum(x: torch.Tensor, seg: torch.Tensor | None, segments: int) -> torch.Tensor:
    if seg is None:
        return x.sum().reshape(1)
    return torch.zeros(segments, dtype=x.dtype, device=x.device).index_add_(0, seg, x)


def bin_counts(x: torch.Tensor, seg: torch.Tensor | None, edges: torch.Tensor) -> torch.Tensor:
    """Counts [S, bins + 2] of flat float64 `x` (segment `seg`, None for one) in `edges`
    [S, bins + 1]: column 0 counts x < e_0, column bins + 1 counts x > e_bins, column 1 + i counts
    e_i ≤ x < e_{i+1} (the last bin closed, as numpy.histogram). NaN counts nowhere.
    """
    segments, width = edges.shape
    bins = width - 1
    lo, hi = _spread(edges[:, 0], seg), _spread(edges[:, -1], seg)
    if seg is None:
        # Right-closed search: i such that e_{i-1} ≤ x < e_i, so 0 below and bins + 1 from e_bins.
        local = torch.bucketize(x, edges[0], right=True)
        local = torch.where(x == hi, bins, local)
        index = local
    else:
        # Estimate the bin by arithmetic, then settle it against the stored edges themselves, so
        # that values on an edge fall exactly where a comparison with the edges puts them.
        guess = ((x - lo) / (hi - lo) * bins).floor_().nan_to_num_(0.0).clamp_(0, bins - 1).long()
        at = seg * width + guess
        flat_edges = edges.reshape(-1)
        guess -= (x < flat_edges[at]).long()
        guess += ((x >= flat_edges[at + 1]) & (guess < bins - 1)).long()
        local = torch.where(x < lo, 0, guess + 1)
        local = torch.where(x > hi, bins + 1, local)
        index = seg * (bins + 2) + local
    # NaN goes to a spare slot past the last segment that is dropped below.
    index = torch.where(torch.isnan(x), segments * (bins + 2), index)
    counts = torch.zeros(segments * (bins + 2) + 1, dtype=torch.int64, device=x.device)
    counts.index_add_(0, index, torch.ones_like(index))
    return counts[:-1].reshape(segments, bins + 2)


def distributions(
    tensors: list[torch.Tensor],
    edges: torch.Tensor | None = None,
    reference: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Moments per tensor, and optionally counts in fixed `edges` and the distance to `reference`.

    Returns [L, 6] float64 with `mean`, `std` = √(Σ(x−μ)²/n), `skew` = (Σ(x−μ)³/n)/std³ (0 for a
    constant tensor), `min`, `max`, `l2` = √Σx²; counts [L, bins + 2] (below, bins…, above) or
    None; ‖x − reference‖₂ per tensor [L] or None.
    """
    device = tensors[0].device
    sizes = [t.numel() for t in tensors]
    stats, counts, dists = [], [], []
    for a, b in _chunks(sizes):
        part = sizes[a:b]
        k = len(part)
        seg = _segments(part, device) if k > 1 else None
        x = torch.cat([t.detach().reshape(-1) for t in tensors[a:b]]).to(torch.float64)
        n = torch.tensor(part, dtype=torch.float64, device=device)
        mean = _segment_sum(x, seg, k) / n
        d = x - _spread(mean, seg)
        d2 = d * d
        m2 = _segment_sum(d2, seg, k) / n
        m3 = _segment_sum(d2.mul_(d), seg, k) / n
        del d, d2
        std = m2.sqrt()
        skew = torch.where(m2 > 0, m3 / (m2 * std), torch.zeros_like(m3))
        if seg is None:
            lo, hi = (v.reshape(1) for v in torch.aminmax(x))
        else:
            zeros = torch.zeros(k, dtype=torch.float64, device=device)
            lo = zeros.scatter_reduce(0, seg, x, "amin", include_self=False)
            hi = zeros.scatter_reduce(0, seg, x, "amax", include_self=False)
        l2 = _segment_sum(x * x, seg, k).sqrt_()
        stats.append(torch.stack([mean, std, skew, lo, hi, l2], dim=1))
        if edges is not None:
            counts.append(bin_counts(x, seg, edges[a:b]))
        if reference is not None:
            r = torch.cat([t.reshape(-1) for t in reference[a:b]]).to(torch.float64)
            diff = x.sub_(r)
            dists.append(_segment_sum(diff.mul_(diff), seg, k).sqrt_())
    return (
        torch.cat(stats),
        torch.cat(counts) if edges is not None else None,
        torch.cat(dists) if reference is not None else None,
    )
