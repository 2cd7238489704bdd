import torch
import torch.nn as nn

# Configuration E of Simonyan & Zisserman (2015): (width, number of 3×3 convs) per stage;
# every stage ends in a 2×2 max-pool.
STAGES_E = ((64, 2), (128, 2), (256, 4), (512, 4), (512, 4))


class VGG19(nn.Module):
    """VGG-19 with BatchNorm (configuration E) and a single linear classifier on the 512 pooled
    features, the CIFAR variant of the Relative Weight Change study, for inputs ≥ 8×8."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int) -> None:
        super().__init__()
        if image_size < 8:
            raise ValueError(f"VGG19 needs images of at least 8x8, got {image_size}")
        layers: list[nn.Module] = []
        width_in = in_channels
        for width, num_convs in STAGES_E:
            for _ in range(num_convs):
                layers += [
                    nn.Conv2d(width_in, width, 3, padding=1),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                ]
                width_in = width
            # ceil_mode: a 1×1 map stays 1×1, so inputs smaller than 32×32 keep all 19 layers.
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        self.features = nn.Sequential(*layers)
        # Inputs larger than 32×32 leave more than 1×1 after five pools.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(512, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))
