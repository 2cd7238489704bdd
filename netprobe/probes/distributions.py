"""Fixed-bin histograms and moments of tensors on their device (weights, activations): plain
deterministic reductions, nothing read on the host, so a capture never syncs."""

from __future__ import annotations

import math

import torch

MOMENTS = ["mean", "std", "skew", "min", "max", "l2"]
SLICE = 1 << 22
REPLICAS = 256


@torch.no_grad()
def symmetric_edges(
    tensors: list[torch.Tensor], bins: int, nonnegative: bool = False, factor: float = 2.0
) -> torch.Tensor:
    """Edges [len(tensors), bins + 1] in float64: ±factor·max|x| per tensor (0…factor·max x when
    `nonnegative` and every value is ≥ 0). A tensor of zeros, or one that is not finite, gets ±1."""
    tensors = [t.detach() for t in tensors]
    peak = factor * torch.stack(torch._foreach_norm(tensors, float("inf"), dtype=torch.float64))
    lo = -peak
    if nonnegative:
        mins = torch.stack([t.min().to(torch.float64) for t in tensors])
        lo = torch.where(mins >= 0, torch.zeros_like(lo), lo)
    ok = torch.isfinite(peak) & (peak > 0)
    hi = torch.where(ok, peak, torch.ones_like(peak))
    lo = torch.where(ok, lo, -torch.ones_like(lo))
    steps = torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64, device=peak.device)
    edges = lo[:, None] + (hi - lo)[:, None] * steps
    edges[:, -1] = hi  # exact upper end, whatever the rounding of the sum
    return edges


@torch.no_grad()
def central_edges(x: torch.Tensor, bins: int, tail: float, sample: int = 1 << 18) -> torch.Tensor:
    """Edges [bins + 1] in float64 from the `tail` to the 1 − `tail` quantile of x's finite values
    (linear interpolation, as numpy.quantile; an evenly strided subset of at most `sample` values
    of a larger x), so that about 2·tail of the mass falls outside. A range of one value (a
    constant output, or one almost all zeros) gets ±1 around it. Stays on the device, no sync."""
    f64 = torch.float64
    flat = x.detach().reshape(-1)
    stride = -(-flat.numel() // sample)
    # An odd stride: a power-of-two one would visit the same columns of every [H, W] map.
    flat = flat[:: stride + (stride > 1 and stride % 2 == 0)].to(f64)
    finite = torch.isfinite(flat)
    last = finite.sum().to(f64) - 1
    where = torch.stack([tail * last, (1 - tail) * last]).clamp(min=0)
    below, frac = where.floor().long(), where - where.floor()
    above = torch.minimum(below + 1, torch.clamp(last.long(), min=0))
    # Only the k smallest and k largest finite values are ever read: two partial sorts (topk)
    # instead of a whole one, 13× faster on 2^18 values. Rank r from the bottom is position r of
    # the smallest; from the top, position `last` − r of the largest.
    k = min(len(flat), int(tail * (len(flat) - 1)) + 3)
    smallest = torch.where(finite, flat, math.inf).topk(k, largest=False).values
    largest = torch.where(finite, flat, -math.inf).topk(k).values
    lower = smallest[torch.stack([below[0], above[0]]).clamp(max=k - 1)]
    upper = largest[(last.long() - torch.stack([below[1], above[1]])).clamp(0, k - 1)]
    ends = torch.stack([lower, upper])  # [[lo at below, at above], [hi at below, at above]]
    lo, hi = (ends[:, 0] + (ends[:, 1] - ends[:, 0]) * frac).unbind()
    ok = torch.isfinite(lo) & torch.isfinite(hi) & (hi > lo)
    centre = torch.nan_to_num(lo, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = torch.where(ok, lo, centre - 1), torch.where(ok, hi, centre + 1)
    edges = lo + (hi - lo) * torch.linspace(0.0, 1.0, bins + 1, dtype=f64, device=flat.device)
    edges[-1] = hi  # exact upper end, whatever the rounding of the sum
    return edges


def bin_counts(x: torch.Tensor, edges: torch.Tensor, spread: bool | None = None) -> torch.Tensor:
    """Counts [bins + 2] of float64 `x` in `edges` [bins + 1]: index 0 counts x < e_0, index
    bins + 1 counts x > e_bins, index 1 + i counts e_i ≤ x < e_{i+1} (the last bin closed, as
    numpy.histogram), found by binary search against the edges (`bucketize`). NaN counts nowhere.
    `spread` (default: off a CPU) counts with one integer `index_add_` into REPLICAS copies of the
    bins, so that GPU atomics do not queue on a few hot addresses."""
    bins = len(edges) - 1
    # Right-closed search: i with e_{i-1} ≤ x < e_i, so 0 below the range and bins + 1 above it.
    # The last edge one ulp up closes the last bin (no float64 lies between e_bins and it), and
    # NaN, which the search puts last, is taken out of `above` after counting: two passes fewer
    # over x than patching the indices with `where`.
    closed = torch.cat([edges[:-1], torch.nextafter(edges[-1:], edges.new_full((1,), math.inf))])
    local = torch.bucketize(x, closed, right=True)
    if not (x.device.type != "cpu" if spread is None else spread):
        counts = torch.bincount(local, minlength=bins + 2)
    else:
        spread = local * REPLICAS + (torch.arange(len(x), device=x.device) & (REPLICAS - 1))
        one = torch.ones(1, dtype=torch.int64, device=x.device).expand(len(x))
        counts = torch.zeros((bins + 2) * REPLICAS, dtype=torch.int64, device=x.device)
        counts.index_add_(0, spread, one)
        counts = counts.view(bins + 2, REPLICAS).sum(1)
    counts[-1] -= torch.count_nonzero(torch.isnan(x))
    return counts


def _pieces(t: torch.Tensor) -> list[torch.Tensor]:
    return list(t.detach().reshape(-1).split(SLICE))


@torch.no_grad()
def tensor_distribution(
    t: torch.Tensor, edges: torch.Tensor | None = None, reference: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One tensor's [mean, std, skew, min, max, l2] in float64, counts in `edges` (or None), and
    ‖t − reference‖₂ (or None); see `distributions`. Reduced in float64 slices of at most SLICE
    elements, so that a huge tensor never needs a whole float64 copy."""
    f64 = torch.float64
    pieces = _pieces(t)
    total = sum(p.sum(dtype=f64) for p in pieces)
    squares = sum(torch.linalg.vector_norm(p, dtype=f64).square() for p in pieces)
    extremes = [torch.aminmax(p) for p in pieces]
    lo = torch.stack([e.min for e in extremes]).min().to(f64)
    hi = torch.stack([e.max for e in extremes]).max().to(f64)
    mean = total / t.numel()
    m2 = m3 = counts = distance = None
    references = _pieces(reference) if reference is not None else [None] * len(pieces)
    for piece, ref in zip(pieces, references):
        x = piece.to(f64)
        d = x - mean
        d2 = d * d
        m2 = d2.sum() if m2 is None else m2 + d2.sum()
        d2.mul_(d)
        m3 = d2.sum() if m3 is None else m3 + d2.sum()
        del d, d2
        if edges is not None:
            c = bin_counts(x, edges)
            counts = c if counts is None else counts + c
        if ref is not None:
            # Not x.sub_: for a float64 tensor `x` is the live parameter itself, not a copy.
            diff = x - ref
            s = diff.mul_(diff).sum()
            distance = s if distance is None else distance + s
    m2, m3 = m2 / t.numel(), m3 / t.numel()
    std = m2.sqrt()
    skew = torch.where(m2 > 0, m3 / (m2 * std), torch.zeros_like(m3))
    stats = torch.stack([mean, std, skew, lo, hi, squares.sqrt()])
    return stats, counts, distance.sqrt() if distance is not None else None


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
    results = [
        tensor_distribution(
            t,
            edges[i] if edges is not None else None,
            reference[i] if reference is not None else None,
        )
        for i, t in enumerate(tensors)
    ]
    stats = torch.stack([r[0] for r in results])
    counts = torch.stack([r[1] for r in results]) if edges is not None else None
    distance = torch.stack([r[2] for r in results]) if reference is not None else None
    return stats, counts, distance
