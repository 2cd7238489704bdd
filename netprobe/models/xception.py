import torch
import torch.nn as nn


class SeparableConv2d(nn.Module):
    """A 3×3 depthwise conv followed by a 1×1 pointwise conv, both without bias."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(
            in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False
        )
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class XceptionBlock(nn.Module):
    """ReLU → separable conv → BN, once per step in `channels`, plus a residual shortcut.
    A block with stride 2 ends in a 3×3/2 max-pool and has a strided 1×1 conv-BN shortcut."""

    def __init__(self, channels: list[int], stride: int = 1, start_with_relu: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:], strict=True)):
            if i == 0 and start_with_relu:
                # Not in place: the shortcut still reads the block's input.
                layers.append(nn.ReLU(inplace=False))
            elif i > 0:
                layers.append(nn.ReLU(inplace=True))
            layers += [SeparableConv2d(c_in, c_out), nn.BatchNorm2d(c_out)]
        if stride != 1:
            layers.append(nn.MaxPool2d(3, stride=stride, padding=1))
        self.residual = nn.Sequential(*layers)
        if stride != 1 or channels[0] != channels[-1]:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(channels[0], channels[-1], 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels[-1]),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x) + self.shortcut(x)


class Xception(nn.Module):
    """Xception (Chollet, 2017) for small images: the paper's entry, middle and exit flows and
    widths, with a stride-1 stem and `middle_blocks` middle-flow blocks (the paper has 8)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        middle_blocks: int = 4,
    ) -> None:
        super().__init__()
        if image_size < 8:
            raise ValueError(f"Xception needs images of at least 8x8, got {image_size}")
        self.entry = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            XceptionBlock([64, 128, 128], stride=2, start_with_relu=False),
            XceptionBlock([128, 256, 256], stride=2),
            XceptionBlock([256, 728, 728], stride=2),
        )
        self.middle = nn.Sequential(
            *[XceptionBlock([728, 728, 728, 728]) for _ in range(middle_blocks)]
        )
        self.exit = nn.Sequential(
            XceptionBlock([728, 728, 1024], stride=2),
            SeparableConv2d(1024, 1536),
            nn.BatchNorm2d(1536),
            nn.ReLU(inplace=True),
            SeparableConv2d(1536, 2048),
            nn.BatchNorm2d(2048),
            nn.ReLU(inplace=True),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.exit(self.middle(self.entry(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))
