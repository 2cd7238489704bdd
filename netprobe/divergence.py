"""Noticing the first non-finite loss without making the host wait for the device every step."""

from __future__ import annotations

import math

import torch

ON_NONFINITE = ("stop", "continue")
NONE = torch.iinfo(torch.int64).max  # no non-finite loss yet


class NonfiniteWatch:
    """The first step whose loss is NaN or ±inf.

    A loss already on the host (a float: a CPU run's monitor reads it anyway) is checked at
    once. Otherwise each step folds the loss into a device scalar (a few tiny kernels, no host
    sync). On a GPU that scalar is copied to pinned host memory without blocking, and the copy
    is read once a CUDA event says it has landed, so the training loop learns of a divergence a
    step or two late but never stalls. On the CPU reading it costs nothing. `settle()` gives
    the exact answer and waits for the device: the monitor calls it at flush points, which sync
    anyway.
    """

    def __init__(self) -> None:
        self._first: torch.Tensor | None = None  # device int64 scalar: the step, or NONE
        self._host: torch.Tensor | None = None
        self._event: torch.cuda.Event | None = None
        self._known: int | None = None
        self.polled = False  # read through an asynchronous copy (a GPU) rather than directly

    def observe(self, loss: torch.Tensor | float, step: int) -> None:
        """Fold in the loss of optimizer step `step` (a float: a loss already on the host)."""
        if isinstance(loss, float):
            if self._known is None and not math.isfinite(loss):
                self._known = step
            return
        loss = loss.detach()
        if self._first is None:
            self._first = torch.full((), NONE, dtype=torch.int64, device=loss.device)
            self.polled = loss.device.type == "cuda"
        # The running minimum of the steps with a non-finite loss (NONE for a finite one) keeps
        # the first: three tiny kernels.
        finite = torch.isfinite(loss) if loss.dim() == 0 else torch.isfinite(loss).all()
        self._first = torch.minimum(self._first, torch.where(finite, NONE, step))
        if self.polled:
            self._poll()

    def restore(self, step: int | None) -> None:
        """Carry over the first non-finite step a resumed run already had (None: none)."""
        self._known = step

    def _poll(self) -> None:
        assert self._first is not None
        if self._event is not None:
            if not self._event.query():
                return  # the last copy is still in flight: look again next step
            self._read(int(self._host))  # type: ignore[arg-type] - pinned host memory, landed
        else:
            pin = torch.cuda.is_available()  # pinned memory lets the copy run asynchronously
            self._host = torch.empty((), dtype=torch.int64, pin_memory=pin)
            self._event = torch.cuda.Event()
        self._host.copy_(self._first, non_blocking=True)  # type: ignore[union-attr]
        self._event.record()

    def _read(self, value: int) -> None:
        if value != NONE and self._known is None:
            self._known = value

    @property
    def first_step(self) -> int | None:
        """The first non-finite step as far as the host knows now; never waits on a GPU."""
        if self._known is None and self._first is not None and not self.polled:
            self._read(int(self._first))
        return self._known

    def settle(self) -> int | None:
        """The exact first non-finite step so far (waits for the device)."""
        if self._known is None and self._first is not None:
            self._read(int(self._first))
        return self._known
