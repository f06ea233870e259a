"""A tile task's pixels cut into the model's windows, and its results made from the model's scores."""

from __future__ import annotations

import numpy as np
import torch

from dask_infer.models.heads import activate
from dask_infer.tiles.grid import Box, Window

__all__ = ["tile_results", "window_crops"]


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
