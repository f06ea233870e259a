"""A tile task's pixels cut into the model's windows, and its results made from the model's scores."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dask_infer.models.heads import activate
from dask_infer.tiles.grid import Box, Window
from dask_infer.tiles.stitch import core_of

__all__ = ["TileWork", "tile_results", "window_crops"]


def window_crops(pixels: np.ndarray, windows: tuple[Window, ...], band: Box) -> np.ndarray:
    """The windows of a classifier's row cut out of the row's ``band`` of pixels, (window, y, x, channel)."""
    return np.stack(
        [
            pixels[0, w.read.y0 - band.y0 : w.read.y1 - band.y0, w.read.x0 - band.x0 : w.read.x1 - band.x0]
            for w in windows
        ]
    )


def tile_results(
    logits: torch.Tensor, outputs: tuple[str, ...], activation: str, axis: int, logits_dtype: str
) -> dict[str, np.ndarray]:
    """``mask``, ``logits`` (as ``logits_dtype``) and ``probabilities`` of scores with classes on ``axis``."""
    result: dict[str, np.ndarray] = {}
    if "mask" in outputs:
        classes = logits.shape[axis]
        dtype = torch.uint8 if classes <= 256 else torch.int32
        result["mask"] = logits.argmax(dim=axis).to(dtype).cpu().numpy()
    if "logits" in outputs:
        result["logits"] = logits.to(getattr(torch, logits_dtype)).cpu().numpy()
    if "probabilities" in outputs:
        moved = logits.movedim(axis, 1) if logits.ndim > 1 else logits[None]
        probs = activate(moved, "softmax" if activation == "none" else activation)
        result["probabilities"] = (probs.movedim(1, axis) if logits.ndim > 1 else probs[0]).cpu().numpy()
    return result


@dataclass(frozen=True)
class TileWork:
    """One tile task's model work: its windows, the band of pixels read for them, what it writes.

    ``dense``: one window, whose core's map gives (class, y, x) scores and a (y, x) mask.
    Otherwise a classifier's row of windows: (tile, class) scores and a (tile,) mask.
    Scores are computed in float32 and ``logits`` returned as ``logits_dtype``.
    """

    windows: tuple[Window, ...]
    band: Box
    outputs: tuple[str, ...]
    activation: str
    dense: bool
    logits_dtype: str = "float32"

    def model_input(self, pixels: np.ndarray) -> np.ndarray:
        """What the model runs on: a map's window as read, a classifier's row cut into its windows."""
        return pixels if self.dense else window_crops(pixels, self.windows, self.band)

    def results(self, scores: torch.Tensor) -> dict[str, np.ndarray]:
        """The task's results from the model's scores on :meth:`model_input`."""
        if self.dense:
            return tile_results(
                core_of(scores[0], self.windows[0]), self.outputs, self.activation, 0, self.logits_dtype
            )
        return tile_results(scores, self.outputs, self.activation, 1, self.logits_dtype)
