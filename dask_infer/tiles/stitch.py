"""Stitching: each tile's output keeps its core (the halo's context is dropped), and the cores make the map.

:func:`core_of` cuts a tile's core out of the model's output on its read window;
:func:`tiled_forward` runs a model tile by tile over one image in memory and stitches
the cores, which is what a tiled run does across workers (and what tests compare with
the whole image's forward pass).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dask_infer.tiles.grid import TileGrid, Window

__all__ = ["core_of", "tiled_forward"]


def core_of(output: torch.Tensor, window: Window) -> torch.Tensor:
    """The core of ``window`` from ``output``, (..., H, W) maps of its read window."""
    ys, xs = window.core.within(window.read)
    return output[..., ys, xs]


@torch.inference_mode()
def tiled_forward(
    model: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, grid: TileGrid
) -> torch.Tensor:
    """``model``'s (C, H, W) map of ``image``, a (1, C, H, W) model input, stitched from ``grid``'s tiles."""
    if not grid.dense:
        raise ValueError("tiled_forward stitches dense grids; a sliding grid's tiles overlap")
    out: torch.Tensor | None = None
    for window in grid.windows():
        read = window.read
        part = model(image[..., read.y0 : read.y1, read.x0 : read.x1])[0]
        if out is None:
            out = part.new_empty((part.shape[0], grid.height, grid.width))
        core = window.core
        out[:, core.y0 : core.y1, core.x0 : core.x1] = core_of(part, window)
    assert out is not None
    return out
