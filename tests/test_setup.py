"""What `build` makes from the config groups: optimizers and lr schedulers from their `_target_`
recipes, with every documented override, against the torch objects built by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from netprobe.config import compose, options
from netprobe.errors import ConfigError
from netprobe.setup import build_optimizer, check_optimizer

# Each option's expected optimizer: class and defaults, written out here, not read from conf/.
BY_HAND = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, weight_decay=0.0, nesterov=False),
    "adam": lambda p: torch.optim.Adam(p, lr=0.001, betas=(0.9, 0.999), weight_decay=0.0),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.001, betas=(0.9, 0.999), weight_decay=0.01),
}


def steps(optimizer_of, n: int = 3) -> list[torch.Tensor]:
    """The weights of a small seeded model after `n` steps of the optimizer `optimizer_of` makes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    optimizer = optimizer_of(model)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    for _ in range(n):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


def test_every_optim_option_is_listed_here():
    assert sorted(BY_HAND) == options("optim")


@pytest.mark.parametrize("name", BY_HAND)
def test_each_optimizer_steps_as_the_one_built_by_hand(name):
    cfg = compose([f"optim={name}"])
    built = steps(lambda m: build_optimizer(m, cfg.optim)[0])
    by_hand = steps(lambda m: BY_HAND[name](m.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(built, by_hand))
    assert build_optimizer(nn.Linear(1, 1), cfg.optim)[1] is None  # no scheduler by default


def test_the_optimizer_is_named_by_the_class_it_builds():
    """run.json's `optim` and the start banner name what trains, not the option it came from."""
    from netprobe.config import optimizer_name
    from netprobe.distributed import launched
    from netprobe.setup import run_info

    for name in options("optim"):
        assert optimizer_name(compose([f"optim={name}"]).optim) == name
    cfg = compose(["optim=sgd", "optim._target_=torch.optim.ASGD", "~optim.momentum",
                   "~optim.nesterov"])  # fmt: skip
    optimizer, _ = build_optimizer(nn.Linear(1, 1), cfg.optim)
    assert type(optimizer).__name__.lower() == optimizer_name(cfg.optim) == "asgd"
    assert run_info(cfg, torch.device("cpu"), launched())["optim"] == "asgd"


def test_user_overrides_reach_the_optimizer():
    cfg = compose(["optim=sgd", "optim.lr=0.05", "optim.momentum=0.5", "optim.nesterov=true"])
    optimizer, _ = build_optimizer(nn.Linear(2, 2), cfg.optim)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"]) == (0.05, 0.5, True)
    cfg = compose(["optim=adamw", "optim.betas=[0.8,0.9]", "optim.weight_decay=0.1"])
    group = build_optimizer(nn.Linear(2, 2), cfg.optim)[0].param_groups[0]
    assert tuple(group["betas"]) == (0.8, 0.9) and group["weight_decay"] == 0.1


def lrs(cfg, epochs: int) -> list[float]:
    optimizer, scheduler = build_optimizer(nn.Linear(2, 2), cfg.optim)
    seen = []
    for _ in range(epochs):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def test_step_scheduler_decays_by_gamma_every_step_size_epochs():
    cfg = compose(["optim=sgd", "optim.scheduler=step", "optim.step_size=2", "optim.gamma=0.5"])
    assert lrs(cfg, 5) == pytest.approx([0.01, 0.01, 0.005, 0.005, 0.0025])


def test_cosine_scheduler_spans_the_run_s_epochs():
    cfg = compose(["optim.scheduler=cosine", "trainer.epochs=4"])
    _, scheduler = build_optimizer(nn.Linear(2, 2), cfg.optim)
    assert isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR)
    # η_t = η_max · (1 + cos(π t / T)) / 2 with T = trainer.epochs
    want = [0.001 * (1 + math.cos(math.pi * t / 4)) / 2 for t in range(4)]
    assert lrs(cfg, 4) == pytest.approx(want)


def test_a_recipe_the_optimizer_refuses_is_one_line_naming_the_key():
    cfg = compose(["optim=sgd", "+optim.bogus=1"])
    with pytest.raises(ConfigError) as exc:
        check_optimizer(cfg.optim)
    message = str(exc.value)
    assert "\n" not in message and "'bogus'" in message and "lr, momentum" in message
