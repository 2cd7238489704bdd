import torch
import torch.nn as nn


class AlexNet(nn.Module):
    """AlexNet for small images as in the Relative Weight Change study (Agrawal et al., 2020):
    five 3×3 conv layers and three linear layers with dropout, for inputs ≥ 8×8."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if image_size < 8:
            raise ValueError(f"AlexNet needs images of at least 8x8, got {image_size}")
        # ceil_mode pools never shrink a map below 1×1, so small inputs keep the same layers
        # (and layer names) as 32×32 ones; the adaptive pool then fixes the classifier's input.
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(64, 192, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(192, 384, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, ceil_mode=True),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(256 * 2 * 2, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(4096, 1024),
            nn.ReLU(inplace=True),
            nn.Linear(1024, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))
