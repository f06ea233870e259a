"""The tile options (``tile``, ``halo``, ``stride``) checked and put in canonical form.

A leaf module like :mod:`dask_infer.options`: ``RunConfig`` checks these without torch.
"""

from __future__ import annotations

from typing import Any

from dask_infer.errors import DaskInferError
from dask_infer.options import check_positive_int

__all__ = ["AUTO", "DEFAULT_OUTPUTS", "TILED_OUTPUTS", "check_tile_options"]

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
