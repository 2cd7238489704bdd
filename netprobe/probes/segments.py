"""Tracked tensors laid end to end in one flat buffer, reduced per tensor in a few kernels."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class Segments:
    """One segment per tracked tensor, in order, in a flat buffer of `total` elements.

    A per-tensor reduction runs over a 2-D view of each run of consecutive equal-sized segments:
    one kernel per run instead of one per tensor (a deep MLP of equal layers is one or two runs),
    so the number of kernels of a probe step barely grows with the number of tensors.
    """

    def __init__(self, sizes: Sequence[int]) -> None:
        self.sizes = list(sizes)
        self.total = sum(self.sizes)
        self.runs: list[tuple[int, int, int]] = []  # (first element, segments, segment size)
        start = 0
        for size in self.sizes:
            if self.runs and self.runs[-1][2] == size:
                first, count, _ = self.runs[-1]
                self.runs[-1] = (first, count + 1, size)
            else:
                self.runs.append((start, 1, size))
            start += size
        # Each buffer made by `buffer`, by identity (held here, so no other tensor takes its id),
        # with its 2-D run views and per-segment views: made once, as a small model's step pays
        # a few microseconds for every view it makes.
        self._views: dict[int, tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]] = {}

    def buffer(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A flat buffer of `total` elements whose views are made once, here."""
        flat = torch.empty(self.total, dtype=dtype, device=device)
        self._views[id(flat)] = (flat, self._run_views(flat), list(flat.split(self.sizes)))
        return flat

    def parts(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """One 1-D view of `flat` per segment."""
        held = self._views.get(id(flat))
        return held[2] if held is not None else list(flat.split(self.sizes))

    def _run_views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [
            flat[first : first + count * size].view(count, size) for first, count, size in self.runs
        ]

    def _reduce(
        self, flat: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], empty: float = 0.0
    ) -> torch.Tensor:
        held = self._views.get(id(flat))
        views = held[1] if held is not None else self._run_views(flat)
        parts = [
            fn(view) if size else flat.new_full((count,), empty)
            for view, (_, count, size) in zip(views, self.runs)
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def sum(self, flat: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Σ per segment (exact counts of 0/1 values in float32 up to 2²⁴ per segment)."""
        return self._reduce(flat, lambda v: v.sum(dim=1, dtype=dtype))

    def amax(self, flat: torch.Tensor) -> torch.Tensor:
        return self._reduce(flat, lambda v: v.amax(dim=1))

    def norm(self, flat: torch.Tensor) -> torch.Tensor:
        """‖·‖₂ per segment."""
        return self._reduce(flat, lambda v: torch.linalg.vector_norm(v, dim=1))

    def count_squares(self, flat: torch.Tensor) -> torch.Tensor:
        """Σx² per segment of a 0/±1 buffer, exact: from ‖x‖₂ rounded (one read, no write) while
        float32's √ and square stay within ½ of the integer, else summed in float64."""
        if max(self.sizes, default=0) > 2**22:
            return self._reduce(flat, lambda v: v.square().sum(dim=1, dtype=torch.float64))
        return self.norm(flat).square_().round_()

    def count(self, flat: torch.Tensor) -> torch.Tensor:
        """Σ per segment of a 0/1 buffer, exact whatever the segment's size."""
        dtype = torch.float64 if max(self.sizes, default=0) > 2**24 else None
        return self.sum(flat, dtype)
