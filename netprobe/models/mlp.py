import torch
import torch.nn as nn


class MLP(nn.Module):
    """Four Linear layers, the first three with BatchNorm and ReLU (feature-correlation study)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        hidden: tuple[int, ...] = (256, 128, 64),
    ) -> None:
        super().__init__()
        widths = [in_channels * image_size * image_size, *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(w_in, w_out), nn.BatchNorm1d(w_out), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
