"""The tile options (``tile``, ``halo``, ``stride``, ``logits_dtype``, ``scale_factor``) checked.

A leaf module like :mod:`dask_infer.options`: ``RunConfig`` checks these without torch.
"""

from __future__ import annotations

import math
from typing import Any

from dask_infer.errors import DaskInferError
from dask_infer.options import LOGITS_DTYPES, check_positive_int

__all__ = [
    "AUTO",
    "DEFAULT_OUTPUTS",
    "LOGITS_DTYPES",
    "TILED_OUTPUTS",
    "check_logits_dtype",
    "check_scale_factor",
    "check_tile_options",
]

AUTO = "auto"
"""``halo`` value asking for the model's measured receptive field."""

TILED_OUTPUTS = ("mask", "logits", "probabilities")
"""What a tiled run writes: the best class, the raw scores and their activation, per pixel or tile."""

DEFAULT_OUTPUTS = ("mask",)
"""What a tiled run writes when ``outputs`` is left at its default."""


def _halo(value: Any) -> int | str | None:
    if value is None or value == AUTO:
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise DaskInferError(f"halo={value!r} must be a whole number of pixels >= 0 or 'auto'")


def check_tile_options(tile: Any, halo: Any, stride: Any) -> tuple[int | None, int | str | None, int | None]:
    """``(tile, halo, stride)`` checked: halo and stride need a tile, fit inside it, leave no gaps.

    Raises
    ------
    DaskInferError
        One line naming the bad value and the fix.
    """
    check_positive_int("tile", tile, optional=True)
    check_positive_int("stride", stride, optional=True)
    halo = _halo(halo)
    if tile is None:
        given = [f"{n}={v!r}" for n, v in (("halo", halo), ("stride", stride)) if v is not None]
        if given:
            raise DaskInferError(f"{given[0]} given without tile; add --tile (e.g. --tile 512)")
        return None, None, None
    if isinstance(halo, int) and halo > tile:
        raise DaskInferError(
            f"halo={halo} is larger than tile={tile}: a tile would be mostly context; give a halo of at "
            f"most {tile}, a larger tile, or --halo auto"
        )
    if stride is not None and stride > tile:
        raise DaskInferError(
            f"stride={stride} is larger than tile={tile}, so tiles would leave gaps of {stride - tile} "
            f"pixels; give a stride of at most {tile}"
        )
    return tile, halo, stride


def check_logits_dtype(value: Any, tile: int | None) -> str:
    """``value`` if it is one of :data:`LOGITS_DTYPES` and fits ``tile``.

    Raises
    ------
    DaskInferError
        For another dtype, or float16 without a tile (only tiled runs store it).
    """
    if value not in LOGITS_DTYPES:
        raise DaskInferError(
            f"logits_dtype={value!r} is not one of {', '.join(LOGITS_DTYPES)}; give --logits-dtype float16 "
            "or float32"
        )
    if tile is None and value != LOGITS_DTYPES[0]:
        raise DaskInferError(
            f"logits_dtype={value!r} given without tile: only tiled runs store float16 logits; add --tile "
            "(e.g. --tile 512) or leave --logits-dtype out"
        )
    return str(value)


def check_scale_factor(value: Any, tile: int | None) -> float:
    """``value`` as a float if it is a finite number > 0, and 1 unless there is a ``tile``.

    Raises
    ------
    DaskInferError
        For zero, a negative or non-finite number, text, or a factor other than 1 without a tile.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise DaskInferError(
            f"scale_factor={value!r} must be a number > 0 (e.g. 0.5 halves each image's height and width)"
        )
    if tile is None and value != 1:
        raise DaskInferError(
            f"scale_factor={value!r} given without tile: it resamples images before tiling; add --tile "
            "(e.g. --tile 512), or resize whole images with --resize"
        )
    return float(value)
