"""``--scale-factor``: each whole image resampled before tiling, computed tile by tile.

The resampled image is defined on the whole image, as
``torch.nn.functional.interpolate(image, size=(H', W'), mode=..., antialias=True,
align_corners=False)`` defines it (``H' = floor(H * factor)``; ``nearest`` without
antialiasing): resampled pixel ``i`` along an axis is a weighted sum of input pixels
around position ``(i + 0.5) * H / H' - 0.5``, with weights that depend on ``i`` and the
image's size only. A tile asks for a range of resampled pixels; :meth:`Resampling.source`
says which input pixels those weights touch (the interpolation margin included) and
:func:`resample_window` computes them there, in float64, so a pixel's value is the same
whichever tile computes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dask_infer.tiles.grid import Box

__all__ = ["Resampling", "axis_weights", "resample_window", "resampled_size"]

_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0}
"""Half-width of each filter at scale 1, in input pixels (``torch``'s ``interp_size / 2``)."""

_CUBIC_A = -0.5
"""The bicubic filter's ``a``, as torch's antialiased bicubic uses."""


def resampled_size(size: int, factor: float) -> int:
    """``floor(size * factor)``, as ``interpolate(scale_factor=factor)`` sizes its output.

    A hair of tolerance keeps ``0.3 * 10`` at 3 despite binary rounding.
    """
    return math.floor(size * factor + 1e-9)


def _filter(mode: str, x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    if mode == "bilinear":
        return np.where(x < 1.0, 1.0 - x, 0.0)
    a = _CUBIC_A
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def axis_weights(size: int, out_size: int, start: int, stop: int, mode: str) -> tuple[int, np.ndarray]:
    """Weights of resampled pixels ``[start, stop)`` along an axis of ``size`` input pixels.

    Parameters
    ----------
    size, out_size
        Input and resampled lengths of the axis.
    start, stop
        The resampled pixels wanted.
    mode
        ``bilinear``, ``bicubic`` (antialiased when shrinking) or ``nearest``.

    Returns
    -------
    lo, weights
        The first input pixel used, and a float64 ``(stop - start, n)`` matrix whose row ``k``
        gives resampled pixel ``start + k`` from input pixels ``lo .. lo + n - 1``.
    """
    scale = size / out_size
    out = np.arange(start, stop, dtype=np.float64)
    if mode == "nearest":
        src = np.minimum(np.floor(out * scale).astype(np.int64), size - 1)
        lo = int(src.min())
        weights = np.zeros((len(out), int(src.max()) - lo + 1))
        weights[np.arange(len(out)), src - lo] = 1.0
        return lo, weights
    support = _SUPPORT[mode] * scale if scale >= 1.0 else _SUPPORT[mode]
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    centre = scale * (out + 0.5)
    first = np.maximum((centre - support + 0.5).astype(np.int64), 0)
    last = np.minimum((centre + support + 0.5).astype(np.int64), size)
    lo, hi = int(first.min()), int(last.max())
    taps = np.arange(lo, hi, dtype=np.float64)
    weights = _filter(mode, (taps[None, :] - centre[:, None] + 0.5) * invscale)
    inside = (taps[None, :] >= first[:, None]) & (taps[None, :] < last[:, None])
    weights = np.where(inside, weights, 0.0)
    total = weights.sum(axis=1, keepdims=True)
    return lo, np.divide(weights, total, out=np.zeros_like(weights), where=total != 0)


@dataclass(frozen=True)
class Resampling:
    """Images of ``height`` x ``width`` resampled to ``out_height`` x ``out_width`` with ``mode``."""

    height: int
    width: int
    out_height: int
    out_width: int
    mode: str = "bilinear"

    @classmethod
    def by(cls, height: int, width: int, factor: float, mode: str) -> Resampling:
        """Images of ``height`` x ``width`` resampled by ``factor``."""
        return cls(height, width, resampled_size(height, factor), resampled_size(width, factor), mode)

    def weights(self, box: Box) -> tuple[Box, np.ndarray, np.ndarray]:
        """The input pixels resampled ``box`` needs, and its y and x weights over them."""
        y0, wy = axis_weights(self.height, self.out_height, box.y0, box.y1, self.mode)
        x0, wx = axis_weights(self.width, self.out_width, box.x0, box.x1, self.mode)
        return Box(y0, y0 + wy.shape[1], x0, x0 + wx.shape[1]), wy, wx

    def source(self, box: Box) -> Box:
        """The input pixels resampled ``box`` is computed from (its interpolation margin included)."""
        return self.weights(box)[0]

    def positions(self, dim: int, resampled: np.ndarray) -> np.ndarray:
        """Input pixel positions (pixel ``i``'s centre is ``i``) of resampled ones along ``dim`` (0: y)."""
        size, out = (self.height, self.out_height) if dim == 0 else (self.width, self.out_width)
        return (np.asarray(resampled, dtype=np.float64) + 0.5) * (size / out) - 0.5


def resample_window(pixels: np.ndarray, wy: np.ndarray, wx: np.ndarray) -> np.ndarray:
    """``pixels`` (1, y, x, channel) of the input region resampled with ``wy`` and ``wx``, as float32."""
    region = pixels[0].astype(np.float64)
    rows = np.tensordot(wy, region, axes=(1, 0))
    out = np.einsum("yxc,Xx->yXc", rows, wx)
    return np.ascontiguousarray(out[None], dtype=np.float32)
