"""Small models of "our own" for the tests: a factory workers import by its path, and bad ones."""

from __future__ import annotations

import time

import torch
from torch import nn


class TinyNet(nn.Module):
    """A small CNN classifier: two convolutions, batch norm, global pooling, a linear head."""

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def tiny_cnn(num_classes: int = 10, width: int = 8) -> TinyNet:
    """The factory an import path names: ``tests.own_models:tiny_cnn``."""
    return TinyNet(num_classes=num_classes, width=width)


def trained_like(num_classes: int = 10, width: int = 8, seed: int = 3) -> TinyNet:
    """A TinyNet with seeded weights and non-trivial batch-norm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = TinyNet(num_classes=num_classes, width=width)
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-0.2, 0.2)
        model.bn1.running_var.uniform_(0.5, 1.5)
    return model.eval()


def not_a_module() -> dict[str, int]:
    """A factory that returns something other than a model."""
    return {"layers": 3}


class Branchy(nn.Module):
    """A model whose forward branches on the data: torch.fx cannot trace it, so it cannot be split."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.mean() > 0:
            y = -y
        return self.fc(y.mean((2, 3)))


def branchy() -> Branchy:
    """Factory of :class:`Branchy`."""
    return Branchy()


def dense_map(channels: int = 4) -> nn.Module:
    """A fully convolutional model: a (channels, y/2, x/2) map per image, seeded."""
    torch.manual_seed(5)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, channels, 3, stride=2, padding=1)
    )


def wait(x: torch.Tensor, seconds: float) -> torch.Tensor:
    """``x``, after ``seconds``; torch.fx keeps the call in a traced graph (``torch.fx.wrap``)."""
    time.sleep(seconds)
    return x


torch.fx.wrap("wait")


class SlowNet(TinyNet):
    """A TinyNet whose forward also waits ``seconds``: a model task long enough to watch,
    whole or cut into stages (the wait is in the first)."""

    def __init__(self, num_classes: int = 10, seconds: float = 0.2) -> None:
        super().__init__(num_classes=num_classes)
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(wait(x, self.seconds))


def slow_cnn(num_classes: int = 10, seconds: float = 0.2) -> SlowNet:
    """The factory ``tests.own_models:slow_cnn``."""
    return SlowNet(num_classes=num_classes, seconds=seconds)
