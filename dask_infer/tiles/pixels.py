"""The built-in preprocessing of tiles: the image's own pixels, scaled and normalised, never resized.

Every step is per pixel with constants fixed for the run (the scale, the model's mean and
std), so a tile's pixels are exactly those of the whole image preprocessed: nothing
depends on where a tile falls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms.v2 import functional as TF

__all__ = ["PixelSteps"]


@dataclass(frozen=True)
class PixelSteps:
    """Stored (N, C, H, W) pixels (after band selection) -> the model's float input, same H and W.

    Attributes
    ----------
    mean, std
        Per-channel normalisation, one value per model input channel.
    normalize
        Whether ``(x - mean) / std`` is applied.
    scale
        Pixels are divided by it; ``None``: 255 for uint8, 65535 for uint16, floats as they are.
    channels
        Input channels of the model.
    expand
        Whether gray images are repeated to three channels and a fourth (alpha) dropped
        (an RGB model given no ``bands``).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    normalize: bool = True
    scale: float | None = None
    channels: int = 3
    expand: bool = True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            x = x.to(torch.float32) / self.scale
        elif x.dtype in (torch.uint8, torch.uint16):
            x = TF.to_dtype(x, torch.float32, scale=True)
        else:
            x = x.to(torch.float32)
        if self.expand and self.channels == 3:
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            elif x.shape[1] == 4:
                x = x[:, :3]
        if self.normalize:
            mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
            x = (x - mean) / std
        return x

    def __repr__(self) -> str:
        return f"PixelSteps(normalize={self.normalize}, scale={self.scale}, channels={self.channels})"
