"""Weight initializers the `init` config group selects (SPEC §2)."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from netprobe.errors import ConfigError
from netprobe.structure import WEIGHT_TYPES

INITIALIZERS = {
    "default": None,
    "kaiming_normal": lambda w, c: nn.init.kaiming_normal_(
        w, nonlinearity=c.get("nonlinearity", "relu")
    ),
    "kaiming_uniform": lambda w, c: nn.init.kaiming_uniform_(
        w, nonlinearity=c.get("nonlinearity", "relu")
    ),
    "xavier_normal": lambda w, c: nn.init.xavier_normal_(w, gain=c.get("gain", 1.0)),
    "xavier_uniform": lambda w, c: nn.init.xavier_uniform_(w, gain=c.get("gain", 1.0)),
    "orthogonal": lambda w, c: nn.init.orthogonal_(w, gain=c.get("gain", 1.0)),
    "ones": lambda w, c: nn.init.ones_(w),
    "zeros": lambda w, c: nn.init.zeros_(w),
}


def initialize(model: nn.Module, cfg: Any) -> None:
    """Apply the initializer `cfg.name` to every conv and linear weight and zero their biases.

    `default` leaves the framework's own initialization untouched.
    """
    name = cfg["name"]
    if name not in INITIALIZERS:
        raise ConfigError(f"unknown init {name!r}; valid init options: {', '.join(INITIALIZERS)}")
    init = INITIALIZERS[name]
    if init is None:
        return
    for module in model.modules():
        if isinstance(module, WEIGHT_TYPES):
            init(module.weight.data, cfg)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
