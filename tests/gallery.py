"""A gallery of planted pathologies: for each doctor code, a tiny model and config that really has
the problem (trained on CPU in seconds), and the layers it should be found on. The doctor tests
train them; scripts/doctor_gallery.py renders their reports. Models are reached by
`model._target_=tests.gallery.Name` from the repository root."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

# The bundled digits, a few epochs: every case trains in seconds on 2 cores.
BASE = ["data=digits", "data.probe_size=128", "trainer.device=cpu", "trainer.flush_every=50"]


class DeepSigmoid(nn.Module):
    """Ten sigmoid layers with the framework's default init: σ' ≤ 1/4 per layer, so the first
    layers' gradients are orders of magnitude below the last ones' (Glorot & Bengio, 2010)."""

    def __init__(
        self, in_channels: int, num_classes: int, image_size: int, depth: int = 10
    ) -> None:
        super().__init__()
        width = 32
        layers: list[nn.Module] = [nn.Flatten(), nn.Linear(in_channels * image_size**2, width)]
        for _ in range(depth - 2):
            layers += [nn.Sigmoid(), nn.Linear(width, width)]
        layers += [nn.Sigmoid(), nn.Linear(width, num_classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class NegativeBias(nn.Module):
    """An MLP whose first layer's biases start at `bias`: most of its ReLU units are below
    zero for every input from the first step, and a unit that never fires never gets a
    gradient to bring it back."""

    def __init__(
        self, in_channels: int, num_classes: int, image_size: int, bias: float = -2.0
    ) -> None:
        super().__init__()
        self.hidden = nn.Linear(in_channels * image_size**2, 128)
        self.out = nn.Linear(128, num_classes)
        with torch.no_grad():
            self.hidden.bias.fill_(bias)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.relu(self.hidden(x.flatten(1))))


class FrozenMiddle(nn.Module):
    """Three Linear+ReLU layers, the middle one frozen (requires_grad off): its weights never
    move while the others learn."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int) -> None:
        super().__init__()
        self.first = nn.Linear(in_channels * image_size**2, 64)
        self.middle = nn.Linear(64, 64)
        self.last = nn.Linear(64, num_classes)
        self.middle.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.first(x.flatten(1)))
        return self.last(torch.relu(self.middle(x)))


class PlainMLP(nn.Module):
    """Three Linear+ReLU layers without normalization: what a too-large step size blows up."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * image_size**2, 64),
            nn.ReLU(),
            nn.Linear(64, 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class NaNGate(nn.Module):
    """A linear classifier plus a gate whose first gradient is NaN while the loss is finite, on
    any machine: the forward takes `gate * 0` where the gate is not positive, but autograd still
    backpropagates a zero through the masked-out √gate, and 0 · ∂√g/∂g at g = −1 is NaN. SGD
    then makes the gate NaN, and the next step's loss NaN."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_channels * image_size**2, num_classes)
        self.gate = nn.Parameter(torch.tensor(-1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.where(self.gate > 0, self.gate.sqrt(), self.gate * 0)
        return self.linear(x.flatten(1)) + gate


def custom(name: str) -> list[str]:
    return ["model=custom", f"model._target_=tests.gallery.{name}"]


@dataclass(frozen=True)
class Case:
    """One planted pathology: the overrides that plant it, and where the doctor must find it."""

    code: str
    overrides: tuple[str, ...]
    layers: tuple[str, ...] = ()  # the layers the finding must name (all of them; may name more)
    what: str = ""


CASES = [
    Case(
        "diverged",
        (*custom("PlainMLP"), "optim=sgd", "optim.lr=1000", "trainer.epochs=2"),
        what="plain MLP, SGD lr 1000: the loss overflows within a few steps",
    ),
    Case(
        "symmetric_init",
        ("init=ones", "probes=[gradients,weights]", "trainer.epochs=2"),
        layers=("net.1.weight", "net.4.weight", "net.7.weight", "net.10.weight"),
        what="mlp with init=ones: every unit of a layer identical",
    ),
    Case(
        "vanishing_gradients",
        (*custom("DeepSigmoid"), "trainer.epochs=2"),
        layers=("net.1.weight",),
        what="ten sigmoid layers: the first layers' gradients vanish",
    ),
    Case(
        "exploding_gradients",
        (*custom("PlainMLP"), "optim=sgd", "optim.lr=20", "trainer.epochs=2"),
        what="plain MLP, SGD lr 20: the gradient norm jumps a thousandfold, the loss stays finite",
    ),
    Case(
        "dead_units",
        (*custom("NegativeBias"), "probes=[gradients,activations]", "trainer.epochs=3"),
        layers=("hidden",),
        what="ReLU layer whose biases start at −2: most units never fire",
    ),
    Case(
        "zero_gradients",
        (*custom("NegativeBias"), "probes=[optim_dynamics]", "trainer.epochs=3"),
        layers=("hidden.weight",),
        what="the same dead ReLU layer: its weights get exactly zero gradients",
    ),
    Case(
        "stalled_layer",
        (*custom("FrozenMiddle"), "probes=[rwc]", "trainer.epochs=3"),
        layers=("middle.weight",),
        what="the middle layer frozen while the others train",
    ),
    Case(
        "loss_plateau",
        ("optim=sgd", "optim.lr=1e-6", "trainer.epochs=3"),
        what="SGD with lr 1e-6: the loss does not move",
    ),
    Case(
        "overfitting",
        (
            "data=synthetic",
            "data.image_size=8",
            "data.num_samples=100",
            "data.noise=3.0",
            "data.batch_size=16",
            "model.hidden=[512,512,512]",
            "trainer.epochs=30",
            "probes=none",
        ),
        what="100 noisy synthetic images, a wide mlp, 30 epochs: memorized, validation loss climbs",
    ),
    Case(
        "unstable_loss",
        (*custom("PlainMLP"), "optim=sgd", "optim.lr=0.5", "trainer.epochs=4", "probes=none"),
        what="plain MLP, SGD lr 0.5: the loss keeps jumping back up",
    ),
    Case(
        "no_learning",
        (
            "data=synthetic",
            "data.image_size=8",
            "data.num_samples=512",
            "data.noise=1000",
            "trainer.epochs=3",
            "probes=none",
        ),
        what="synthetic images drowned in noise (std 1000 on unit patterns): nothing to learn",
    ),
]
