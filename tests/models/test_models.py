from pathlib import Path

import pytest
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from netprobe.models import build_model
from netprobe.models.alexnet import AlexNet
from netprobe.models.cnn import CNN
from netprobe.models.mlp import MLP
from netprobe.models.resnet import ResNet18
from netprobe.models.vgg import VGG19
from netprobe.models.xception import Xception

MODEL_CONF = Path(__file__).resolve().parents[2] / "conf" / "model"
MODELS = [AlexNet, VGG19, ResNet18, Xception, MLP, CNN]
TARGETS = {
    "alexnet": "netprobe.models.alexnet.AlexNet",
    "vgg19": "netprobe.models.vgg.VGG19",
    "resnet18": "netprobe.models.resnet.ResNet18",
    "xception": "netprobe.models.xception.Xception",
    "mlp": "netprobe.models.mlp.MLP",
    "cnn": "netprobe.models.cnn.CNN",
}


def forward_backward(model: nn.Module, in_channels: int, image_size: int) -> torch.Tensor:
    torch.manual_seed(0)
    out = model(torch.randn(2, in_channels, image_size, image_size))
    out.square().mean().backward()
    return out


@pytest.mark.parametrize("image_size", [8, 28, 32])
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("model_cls", MODELS, ids=lambda cls: cls.__name__)
def test_forward_backward(model_cls: type[nn.Module], in_channels: int, image_size: int) -> None:
    model = model_cls(in_channels=in_channels, num_classes=10, image_size=image_size)
    out = forward_backward(model, in_channels, image_size)
    assert out.shape == (2, 10)
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"


@pytest.mark.parametrize("model_cls", [AlexNet, VGG19, ResNet18, Xception, CNN])
def test_rejects_images_below_8x8(model_cls: type[nn.Module]) -> None:
    with pytest.raises(ValueError, match="8x8"):
        model_cls(in_channels=3, num_classes=10, image_size=4)


@pytest.mark.parametrize("name", TARGETS)
def test_build_model_from_plain_dict(name: str) -> None:
    cfg = {
        "name": name,
        "_target_": TARGETS[name],
        "in_channels": 3,
        "num_classes": 10,
        "image_size": 32,
    }
    model = build_model(cfg)
    assert type(model).__name__ == TARGETS[name].rsplit(".", 1)[1]
    assert forward_backward(model, 3, 32).shape == (2, 10)


def compose_model(option: str, **overrides: object) -> DictConfig:
    data = {"channels": 1, "num_classes": 10, "image_size": 8}
    cfg = OmegaConf.create({"data": data, "model": OmegaConf.load(MODEL_CONF / f"{option}.yaml")})
    cfg.model.merge_with(overrides)
    return cfg.model


@pytest.mark.parametrize("name", TARGETS)
def test_config_builds_its_model(name: str) -> None:
    cfg = compose_model(name)
    assert cfg.name == name
    assert cfg._target_ == TARGETS[name]
    model = build_model(cfg)
    assert forward_backward(model, 1, 8).shape == (2, 10)


def test_custom_config_needs_a_target_and_passes_extras_through() -> None:
    assert OmegaConf.is_missing(compose_model("custom"), "_target_")
    cfg = compose_model("custom", _target_="netprobe.models.cnn.CNN", width=8)
    model = build_model(cfg)
    assert isinstance(model, CNN)
    assert model.features[0].out_channels == 8
