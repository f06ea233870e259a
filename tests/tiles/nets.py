"""Small models for tiled runs, importable on the workers: a fully convolutional net and a tile classifier."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinyFCN(nn.Module):
    """Conv, a stride-2 conv, conv, then bilinear upsampling to the input's size: output stride 2."""

    def __init__(self, classes: int = 4, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.body = nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(8, 8, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(8, classes, 3, padding=1),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.body(x), size=x.shape[-2:], mode="bilinear", align_corners=False)


class TileClassifier(nn.Module):
    """Conv, global average pooling, linear: scores (N, classes) for tiles of any size."""

    def __init__(self, classes: int = 5, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def tiny_fcn() -> nn.Module:
    """Factory for ``--model tests.tiles.nets:tiny_fcn``."""
    return TinyFCN()


def tile_classifier() -> nn.Module:
    """Factory for ``--model tests.tiles.nets:tile_classifier``."""
    return TileClassifier()
