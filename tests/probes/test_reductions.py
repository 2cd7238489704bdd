"""The dtypes and cached sizes the probes' device reductions share."""

from __future__ import annotations

import torch

from netprobe.probes.reductions import device_sizes, stat_dtype, to_float64


def test_statistics_of_low_precision_tensors_are_float32_and_of_float64_ones_float64() -> None:
    half, single, double = (
        torch.zeros(2, dtype=d) for d in (torch.bfloat16, torch.float32, torch.float64)
    )
    assert stat_dtype([half]) == torch.float32
    assert stat_dtype([half, single]) == torch.float32
    assert stat_dtype([single, double]) == torch.float64
    assert to_float64(single + 0.1).dtype == torch.float64
    assert to_float64(single + 0.1).tolist() == [float(torch.tensor(0.1))] * 2


def test_sizes_are_made_once_per_device_and_dtype() -> None:
    sizes = device_sizes((3, 5), torch.device("cpu"), torch.float32)
    assert sizes.tolist() == [3.0, 5.0] and sizes.dtype == torch.float32
    assert device_sizes((3, 5), torch.device("cpu"), torch.float32) is sizes
    assert device_sizes((3, 5), torch.device("cpu")).dtype == torch.int64
