"""Preprocessing as a torch module, so it runs on the worker's device inside the graph.

:class:`PreprocessSpec` says what to do (data, sent to workers once, inside the runtime
spec); :class:`Preprocess` does it. The built-in steps, in order: pick and order bands,
scale pixels to [0, 1], gray to RGB and alpha dropped (RGB models only), resize of the
shorter side, centre crop to the model's input, normalisation. A user ``transform``
replaces every step but the band selection.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from dask_infer.input_options import describe_callable

__all__ = ["Preprocess", "PreprocessSpec", "Transform"]

_FLOAT_BYTES = 64 << 20
"""Most bytes of full-size float32 pixels converted at once."""

_MODES = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
}

Transform = Callable[[torch.Tensor], torch.Tensor]
"""A user's preprocessing: the stored images as an (N, C, H, W) tensor in, the model's float input out."""


@dataclass(frozen=True)
class PreprocessSpec:
    """What turns stored images into the model's input; small, and sent to each worker once.

    Attributes
    ----------
    size
        Side of the centre crop: the model's input height and width.
    mean, std
        Per-channel normalisation, one value per model input channel.
    resize
        Side the shorter image side is resized to before the crop; ``None``: ``size``.
    interpolation
        ``"bilinear"``, ``"bicubic"`` or ``"nearest"`` (the first two antialiased).
    normalize
        Whether ``(x - mean) / std`` is applied; if not, the model gets pixels in [0, 1].
    bands
        0-based indices of the stored channels the model takes, in its order; ``None``: all.
    scale
        Pixels are divided by it (integers and floats); ``None``: the integer dtype's
        maximum (255, 65535), floats as they are.
    channels
        Input channels of the model. With 3, gray images are repeated to RGB and a fourth
        (alpha) channel is dropped when no ``bands`` are picked.
    transform
        A callable replacing every built-in step but ``bands``; see :class:`Preprocess`.
    model_input
        ``(channels, height, width)`` of one image as the model receives it: what
        ``transform`` returned on the input's first images; ``None``: ``(channels, size, size)``.
    """

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: int | None = None
    interpolation: str = "bilinear"
    normalize: bool = True
    bands: tuple[int, ...] | None = None
    scale: float | None = None
    channels: int = 3
    transform: Transform | None = None
    model_input: tuple[int, int, int] | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of one image as the model receives it."""
        return self.model_input or (self.channels, self.size, self.size)

    def build(self, *, dtype: torch.dtype = torch.float32) -> Preprocess:
        """The module that applies this spec, with output ``dtype``."""
        return Preprocess(
            self.size,
            self.mean,
            self.std,
            dtype=dtype,
            resize=self.resize,
            interpolation=self.interpolation,
            normalize=self.normalize,
            bands=self.bands,
            scale=self.scale,
            channels=self.channels,
            transform=self.transform,
        )

    def describe(self) -> dict[str, Any]:
        """A JSON-safe record of the steps, for output attrs and resume checks."""
        if self.transform is not None:
            return {
                "transform": describe_callable(self.transform),
                "bands": list(self.bands) if self.bands is not None else None,
                "model_input": list(self.input_shape),
            }
        return {
            "resize": self.resize or self.size,
            "crop": self.size,
            "interpolation": self.interpolation,
            "normalize": self.normalize,
            "mean": list(self.mean),
            "std": list(self.std),
            "bands": list(self.bands) if self.bands is not None else None,
            "scale": self.scale,
            "channels": self.channels,
        }


class Preprocess(nn.Module):
    """Stored (N, y, x, C) images (uint8, uint16 or float) -> the model's float (N, C', H, W) input.

    The result is in channels-last memory format, in ``dtype``.

    Built-in steps: ``bands`` picked, pixels divided by ``scale`` (default: 255 for uint8,
    65535 for uint16, 1 for floats), gray repeated to three channels and alpha dropped
    when the model takes 3 channels, the shorter side resized to ``resize`` (antialiased
    ``interpolation``) and the centre ``size`` x ``size`` cropped, as torchvision's
    classification transforms do, then ``(x - mean) / std`` unless ``normalize`` is false.

    With ``transform``, the images after ``bands`` are passed to it as one contiguous
    (N, C, H, W) tensor of their stored dtype (uint8, uint16 or float), on the worker's
    device; it must return a floating (N, C', H', W') tensor, the model's input. None of
    the other steps run: the transform scales, resizes and normalises itself (a
    ``torchvision.transforms.v2`` pipeline such as ``Compose([Resize(256), CenterCrop(224),
    ToDtype(torch.float32, scale=True), Normalize(mean, std)])``).

    Parameters
    ----------
    size
        Model input height and width.
    mean, std
        Per-channel normalisation.
    dtype
        Floating dtype of the output.
    resize, interpolation, normalize, bands, scale, channels, transform
        As in :class:`PreprocessSpec`.
    """

    def __init__(
        self,
        size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        *,
        dtype: torch.dtype = torch.float32,
        resize: int | None = None,
        interpolation: str = "bilinear",
        normalize: bool = True,
        bands: tuple[int, ...] | None = None,
        scale: float | None = None,
        channels: int = 3,
        transform: Transform | None = None,
    ) -> None:
        super().__init__()
        self.size = size
        self.resize = resize or size
        self.interpolation = _MODES[interpolation]
        self.normalize = normalize
        self.bands = bands
        self.scale = scale
        self.channels = channels
        self.transform = transform
        self.dtype = dtype
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.transform is not None:
            return self._transform(images)
        # Large images are converted to float a few at a time: a batch of 32 images of
        # 1024x1024 would otherwise take 400 MB of float32 before it is resized to the
        # model's input. Each image is resized on its own, so the result is the same.
        step = max(1, _FLOAT_BYTES // max(1, images[0].numel() * 4)) if len(images) else 1
        if len(images) > step and tuple(images.shape[1:3]) != (self.size, self.size):
            return torch.cat([self._convert(images[i : i + step]) for i in range(0, len(images), step)])
        return self._convert(images)

    def pick_bands(self, images: torch.Tensor) -> torch.Tensor:
        """The stored (N, y, x, C) ``images`` as (N, C, H, W), with only ``bands``, in their order."""
        x = images.permute(0, 3, 1, 2)
        if self.bands is not None:
            x = x[:, list(self.bands)]
        return x

    def _transform(self, images: torch.Tensor) -> torch.Tensor:
        assert self.transform is not None
        out = self.transform(self.pick_bands(images).contiguous())
        return out.to(self.dtype).contiguous(memory_format=torch.channels_last)

    def _convert(self, images: torch.Tensor) -> torch.Tensor:
        x = self.pick_bands(images)
        if self.scale is not None:
            x = x.to(torch.float32) / self.scale
        elif x.dtype == torch.uint8 or x.dtype == torch.uint16:
            x = TF.to_dtype(x, torch.float32, scale=True)
        else:
            x = x.to(torch.float32)
        if self.channels == 3 and self.bands is None:
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            elif x.shape[1] == 4:
                x = x[:, :3]
        if min(x.shape[-2:]) != self.resize:
            antialias = self.interpolation != InterpolationMode.NEAREST
            x = TF.resize(x, [self.resize], interpolation=self.interpolation, antialias=antialias)
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = TF.center_crop(x, [self.size, self.size])
        if self.normalize:
            x = (x - self.mean) / self.std
        # Channels-last is the layout the images arrive in, and oneDNN and cuDNN run
        # convolutions faster in it (ResNet-50 on two CPU cores: 14.8 vs 10.3 images/s).
        return x.to(self.dtype).contiguous(memory_format=torch.channels_last)
