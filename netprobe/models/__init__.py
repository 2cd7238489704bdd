"""Models the `model` config group builds; each takes `in_channels`, `num_classes`, `image_size`."""

from __future__ import annotations

from typing import Any

import torch.nn as nn
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf


def build_model(cfg: DictConfig | dict[str, Any]) -> nn.Module:
    """Instantiate `cfg._target_` with every other key except `name` as a keyword argument."""
    kwargs = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    kwargs.pop("name", None)
    return instantiate(kwargs, _convert_="all")
