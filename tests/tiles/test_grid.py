"""Tile geometry with literal answers: cores, read windows, border clipping, chunks touched."""

from __future__ import annotations

import pytest

from dask_infer.errors import DaskInferError, InputError
from dask_infer.tiles.grid import Box, dense_grid, sliding_grid, storage_chunks
from dask_infer.tiles.options import check_tile_options


def test_dense_cores_partition_the_image_and_reads_clip_at_borders() -> None:
    grid = dense_grid(10, 7, tile=4, halo=2)
    assert (grid.rows, grid.cols) == (3, 2)
    assert grid.window(0, 0).core == Box(0, 4, 0, 4)
    assert grid.window(0, 0).read == Box(0, 6, 0, 6)
    assert grid.window(1, 1).core == Box(4, 8, 4, 7)
    assert grid.window(1, 1).read == Box(2, 10, 2, 7)
    assert grid.window(2, 0).core == Box(8, 10, 0, 4)
    assert grid.window(2, 0).read == Box(6, 10, 0, 6)
    covered = [[0] * 7 for _ in range(10)]
    for w in grid.windows():
        for y in range(w.core.y0, w.core.y1):
            for x in range(w.core.x0, w.core.x1):
                covered[y][x] += 1
    assert all(v == 1 for row in covered for v in row)
    assert grid.window(1, 1).core.within(grid.window(1, 1).read) == (slice(2, 6), slice(2, 5))


def test_halo_overhead_counts_extra_pixels() -> None:
    assert dense_grid(8, 8, tile=4, halo=0).halo_overhead == 0.0
    # Each of 4 tiles reads 6x6 = 36 pixels for 16 kept: 144 / 64 - 1.
    assert dense_grid(8, 8, tile=4, halo=2).halo_overhead == pytest.approx(144 / 64 - 1)


def test_sliding_windows_stay_inside_and_centres() -> None:
    grid = sliding_grid(10, 9, tile=4, stride=2)
    assert (grid.rows, grid.cols) == (4, 3)
    assert grid.window(3, 2).core == Box(6, 10, 4, 8)
    assert grid.window(3, 2).read == grid.window(3, 2).core
    assert grid.centres() == ([1.5, 3.5, 5.5, 7.5], [1.5, 3.5, 5.5])


def test_storage_chunks_of_a_window() -> None:
    assert storage_chunks(Box(0, 4, 0, 4), 4, 4) == ((0, 0),)
    assert storage_chunks(Box(3, 9, 2, 5), 4, 4) == ((0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1))


def test_tile_larger_than_image_is_refused() -> None:
    with pytest.raises(InputError, match="tile=12 is larger than the images"):
        dense_grid(10, 20, tile=12, halo=0)


@pytest.mark.parametrize(
    ("tile", "halo", "stride", "match"),
    [
        (8, 9, None, "halo=9 is larger than tile=8"),
        (8, None, 9, "stride=9 is larger than tile=8, so tiles would leave gaps of 1"),
        (None, 4, None, "halo=4 given without tile"),
        (8, "lots", None, "halo='lots' must be a whole number"),
        (0, None, None, "tile=0 must be a whole number >= 1"),
    ],
)
def test_bad_tile_options(tile: object, halo: object, stride: object, match: str) -> None:
    with pytest.raises(DaskInferError, match=match):
        check_tile_options(tile, halo, stride)


def test_tile_options_canonical() -> None:
    assert check_tile_options(8, "4", None) == (8, 4, None)
    assert check_tile_options(8, "auto", 4) == (8, "auto", 4)
