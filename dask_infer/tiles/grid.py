"""Tile geometry: where each tile lies, what it reads (with its halo) and which storage chunks that is.

Two kinds of grid, both pure arithmetic on pixel indices:

* dense (:func:`dense_grid`): the tiles' cores cut the image into a partition of
  ``tile`` x ``tile`` blocks (smaller at the bottom and right edges); each reads its core
  plus ``halo`` pixels on every side, clipped at the image's border, so a border tile sees
  the image's edge exactly where the whole image does. Core origins are multiples of
  ``tile`` and read origins are those minus ``halo`` (or 0): both multiples of a model's
  output stride when ``tile`` and ``halo`` are.
* sliding (:func:`sliding_grid`): ``tile`` x ``tile`` windows every ``stride`` pixels,
  all inside the image, for a classifier's prediction per tile.
"""

from __future__ import annotations

from dataclasses import dataclass

from dask_infer.errors import InputError

__all__ = ["Box", "TileGrid", "Window", "dense_grid", "sliding_grid", "storage_chunks"]


@dataclass(frozen=True)
class Box:
    """Pixels ``[y0, y1) x [x0, x1)`` of an image."""

    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def pixels(self) -> int:
        return self.height * self.width

    def within(self, outer: Box) -> tuple[slice, slice]:
        """This box's ``(y, x)`` slices inside an array holding ``outer``."""
        return (
            slice(self.y0 - outer.y0, self.y1 - outer.y0),
            slice(self.x0 - outer.x0, self.x1 - outer.x0),
        )


@dataclass(frozen=True)
class Window:
    """One tile: the pixels its result covers (``core``) and those it reads (``read``)."""

    row: int
    col: int
    core: Box
    read: Box


@dataclass(frozen=True)
class TileGrid:
    """The tiles of one ``height`` x ``width`` image.

    Attributes
    ----------
    height, width
        The image's size in pixels.
    tile
        Side of a tile.
    halo
        Context pixels read on each side of a dense tile (0 for a sliding grid).
    stride
        Step between tile origins; ``tile`` for a dense grid.
    dense
        Whether the cores partition the image (a map stitched from tiles) or are
        overlapping windows (a prediction per tile).
    """

    height: int
    width: int
    tile: int
    halo: int
    stride: int
    dense: bool

    @property
    def rows(self) -> int:
        """Tiles down the image."""
        return self._count(self.height)

    @property
    def cols(self) -> int:
        """Tiles across the image."""
        return self._count(self.width)

    def _count(self, size: int) -> int:
        if self.dense:
            return -(-size // self.tile)
        return (size - self.tile) // self.stride + 1

    def _span(self, index: int, size: int) -> tuple[int, int, int, int]:
        """Core ``(start, stop)`` and read ``(start, stop)`` of tile ``index`` along one axis."""
        start = index * self.stride
        stop = min(start + self.tile, size)
        return start, stop, max(0, start - self.halo), min(size, stop + self.halo)

    def window(self, row: int, col: int) -> Window:
        """Tile ``(row, col)``."""
        cy0, cy1, ry0, ry1 = self._span(row, self.height)
        cx0, cx1, rx0, rx1 = self._span(col, self.width)
        return Window(row, col, Box(cy0, cy1, cx0, cx1), Box(ry0, ry1, rx0, rx1))

    def windows(self) -> tuple[Window, ...]:
        """Every tile, row by row."""
        return tuple(self.window(r, c) for r in range(self.rows) for c in range(self.cols))

    def centres(self) -> tuple[list[float], list[float]]:
        """Pixel positions (y, x; pixel ``i`` spans ``[i, i+1)``, centre ``i``) of the tiles' centres."""
        half = (self.tile - 1) / 2
        return (
            [r * self.stride + half for r in range(self.rows)],
            [c * self.stride + half for c in range(self.cols)],
        )

    @property
    def computed_pixels(self) -> int:
        """Pixels the model runs on over all tiles (with halos and overlaps)."""
        return sum(w.read.pixels for w in self.windows())

    @property
    def halo_overhead(self) -> float:
        """Pixels computed per pixel covered, less one: the extra work halos and overlaps cost."""
        covered = self.height * self.width if self.dense else self.rows * self.cols * self.tile**2
        return self.computed_pixels / covered - 1.0


def _check_fits(tile: int, height: int, width: int) -> None:
    if tile > min(height, width):
        raise InputError(
            f"tile={tile} is larger than the images ({height}x{width} pixels); give a tile of at most "
            f"{min(height, width)}"
        )


def dense_grid(height: int, width: int, tile: int, halo: int) -> TileGrid:
    """Tiles whose cores partition the image, each read with ``halo`` pixels of context.

    Raises
    ------
    InputError
        When ``tile`` exceeds the image's height or width.
    """
    _check_fits(tile, height, width)
    return TileGrid(height, width, tile, halo, tile, dense=True)


def sliding_grid(height: int, width: int, tile: int, stride: int) -> TileGrid:
    """``tile`` x ``tile`` windows every ``stride`` pixels, all inside the image.

    Raises
    ------
    InputError
        When ``tile`` exceeds the image's height or width.
    """
    _check_fits(tile, height, width)
    return TileGrid(height, width, tile, 0, stride, dense=False)


def storage_chunks(box: Box, chunk_y: int, chunk_x: int) -> tuple[tuple[int, int], ...]:
    """Grid indices ``(i, j)`` of the storage chunks of ``chunk_y`` x ``chunk_x`` pixels ``box`` touches."""
    return tuple(
        (i, j)
        for i in range(box.y0 // chunk_y, (box.y1 - 1) // chunk_y + 1)
        for j in range(box.x0 // chunk_x, (box.x1 - 1) // chunk_x + 1)
    )
